"""Pictures and tables a person looks at: heatmap overlays, plots, spreadsheets, HTML."""

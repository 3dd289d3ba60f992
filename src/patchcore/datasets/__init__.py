"""Public benchmark datasets: download, verify and unpack into our layouts (`download.py`)."""

from .download import (
    DATASETS,
    Archive,
    DatasetInfo,
    DownloadError,
    LicenceError,
    download_dataset,
    licence_accepted,
)

__all__ = ["DATASETS", "Archive", "DatasetInfo", "DownloadError", "LicenceError",
           "download_dataset", "licence_accepted"]

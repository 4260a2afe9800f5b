"""Data: list files, canonical image loading, data sets, split protocols and the synthetic default set."""
from data.dataset import HashListDataset, make_loader, open_run_split, open_split
from data.images import image_transform, load_canonical, save_png
from data.lists import ImageList, read_list, write_list

__all__ = ["HashListDataset", "make_loader", "open_run_split", "open_split", "image_transform", "load_canonical",
           "save_png", "ImageList", "read_list", "write_list"]

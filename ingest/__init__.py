"""The data a trial reads: image files found, decoded (DICOM included), cached, fingerprinted,
split and checked for leaks, up to the `Dataset`. The search's driver calls it, and its decoding
tasks run on the workers. It imports nothing of the trial's code (`trainables`), of `search` or of
`spaces`, and its errors name problems in the data's terms (the commands add the flag to use); the
trial's code imports from here.

Example:
    >>> from ingest.dataset import load_dataset
    >>> data = load_dataset("../shared/data/pneumoniamnist/pneumoniamnist.npz", image_size=32)
"""

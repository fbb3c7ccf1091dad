"""Data side of UMT: input readers, the sharder, the streaming loader and image/text transforms."""

"""Data: a folder of images -> checked, split samples -> decoded, augmented tensors.

images (decode, EXIF, colour modes) -> scan (find classes, check files, split) ->
transforms (albumentations pipelines, TTA views) -> loaders (Dataset, collation) ->
decoded / features (the on-disk caches; caches names their folders).
"""

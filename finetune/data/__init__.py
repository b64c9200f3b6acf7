"""Data: a folder of images -> checked, split samples -> decoded, augmented tensors.

images (decode, EXIF, colour modes) -> scan (find classes, check files, split) ->
transforms (albumentations pipelines, TTA views) -> loaders (Dataset, collation) ->
decoded / features (the on-disk caches; caches names their folders).
"""

import os

# albumentations asks PyPI for its newest version on every import (an HTTP request with a 2 s
# timeout). finetune runs offline and never phones home, so its documented switch is set here,
# before any module of this package imports it; a value the user set is kept.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

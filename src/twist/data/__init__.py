"""Datasets as ``uint8`` tensors: image folders, npz files, npz split folders, built-in ``digits``.

``load_dataset(spec, split, ...)`` returns an :class:`ImageDataset`; ``batch_loader(...)`` turns
it into batches of ``(uint8 images (b, C, H, W), int64 indices)``. Every image of a dataset has
the same number of channels (1 or 3) and the same size.

Sources (chosen from ``spec``)
------------------------------
- ``"digits"``: scikit-learn's 8x8 digits (1797 images, 10 classes); values 0..16 become
  ``round(v * 255 / 16)``. The literal string always means the built-in set (write ``./digits``
  for a folder of that name). It has one split: every ``split`` returns the same 1797 images.
- a ``.npz`` file: ``x`` (N, H, W, C) or (N, H, W) ``uint8`` with C in {1, 3}; optional ``y``
  (N,) integer labels; ``classes.txt`` beside the file names the classes. One split: every
  ``split`` returns the whole file.
- a directory holding ``*.npz`` files (e.g. ``cifar10/``): split ``s`` is the concatenation of
  the files whose stem is ``s`` or starts with ``s`` followed by a non-letter (``train_0``,
  ``train1``; not ``trainval``), in natural order (``train_2`` before ``train_10``). So
  ``train`` = ``train_0.npz + train_1.npz`` and ``test`` = ``test.npz``. ``classes.txt`` in the
  directory gives class names.
- any other directory: an image folder, searched recursively (symlinks followed). Files and
  folders whose name starts with ``.`` are ignored, as are files without an image extension
  (:data:`IMAGE_EXTENSIONS`). When some first-level sub-folder holds images, the labels are the
  index of that sub-folder in the sorted list of such sub-folders (``class_names``); images lying
  directly in the top folder then have no class: they are left out and listed in ``skipped``
  (reason "outside the class sub-folders"), without stopping under ``bad_files='stop'``.
  Without such sub-folders ``labels`` and ``class_names`` are ``None``. One split: every
  ``split`` returns the whole folder (point the spec at the split's folder instead).

- WebDataset-style tar shards: a ``.tar`` file, a list of them (a Python list or one string
  separated by commas), or a folder whose top level holds ``.tar`` files: members ``KEY.jpg``
  (any image extension) with an optional ``KEY.cls`` integer label (labels only when every image
  has one). Always streamed; see :mod:`twist.data.shards`.

Arrays (npz, digits) are always held in memory; ``max_memory_gb`` concerns folders only.

Folder images
-------------
Decoded with PIL (formats: JPEG, PNG, BMP, GIF, TIFF, WebP, PPM/PGM/PBM; first frame), with the
EXIF orientation applied. Alpha is composited on white (also palette/grey transparency);
palette, CMYK, YCbCr, ... become RGB; 1-bit becomes 0/255; 16-bit grey is scaled to 8 bits
(``v * 255 / 65535``, rounded; never clipped at 255). The dataset has 1 channel when every
usable image is grey (modes 1, L, LA, I, I;16*, F), else 3 (grey images are replicated).
Size: with ``image_size > 0`` each image's shorter side is resized (bicubic, antialiased) to
``image_size`` and the centre ``image_size`` square is cropped. With ``image_size == 0`` images
keep their size when all have the same one; otherwise they are brought to a square whose side is
the median shorter side (rounded) in the same way. ``image_size > 0`` also resizes npz/digits
arrays whose size differs (same resize + crop).

Bad files (``bad_files``)
-------------------------
A bad file is one that cannot become an image: zero bytes, not an image (e.g. text named
``.jpg``), corrupt or truncated data, permission denied, a broken link or a symlink loop, a
directory that cannot be listed, or more pixels than ``max_pixels`` (decompression-bomb guard,
default PIL's ``Image.MAX_IMAGE_PIXELS``, ~0.9e8; PIL's own ``DecompressionBombError`` counts
too). A directory symlink pointing to one of its own ancestors is a bad entry ("symlink loop")
and is not followed; a directory reached a second time through another link is not followed
either and is listed as a note. ``'skip'`` lists ``(path, reason)`` in ``dataset.skipped`` and
goes on; ``'stop'`` raises :class:`DataError` once the folder has been checked (and, for
in-memory folders, decoded), naming the first bad file in sorted path order and how many others
there are.
A dataset with no usable image raises :class:`DataError` whatever the policy. File names that
are not valid UTF-8 are kept as ``str`` with surrogate escapes (they open fine); use
:func:`display_path` to print or write them (``write_skipped`` does).

Memory and streaming
--------------------
A folder is first listed without opening any file (``os.scandir``, :mod:`twist.data.listing`).
The decision between memory and streaming reads only a seeded sample of 64 headers: the
estimated decoded size is ``N * C * H * W`` bytes with N the listed count, C 1 when every
sampled image is grey (else 3) and (H, W) ``image_size`` (without it, the sample's median
shorter side). Above ``max_memory_gb`` GiB the folder is streamed, else (or with
``scan='full'``) every header is checked (size, mode, orientation, pixel limit,
``Image.verify``, which checks PNG chunk CRCs) and the exact size decides again: small folders
are decoded completely at load time, in threads, so nothing can fail during training; they are
unaffected by ``scan``. A streamed folder under ``scan='list'`` (the default) opens nothing
more: its bad files are found when decoded (below), so ``bad_files='stop'`` only stops for
entries the listing itself rejects (unlistable folders, symlink loops); ``scan='full'`` checks
every header first, as before. With ``index_path``, a streamed list is written there (JSON,
paths relative to the root) and a later load with the same root (same modification times of
the root and its first-level folders) and settings reads it instead of listing again.

Streamed folders (and shards) decode per batch, in ``DataLoader`` workers when
``num_workers > 0``. With ``crop_size > 0`` (what training, evaluation and extraction pass:
the global crop size) a streamed image is the release's evaluation crop: shorter side resized
(bicubic) to ``round(crop_size / 0.875)`` (256 for 224), centre ``crop_size`` square; otherwise
the resize + centre crop of "Folder images". For training, ``batch_loader(views=ViewPlan)``
instead cuts every view from the ORIGINAL file (:mod:`twist.data.views`): ``image_size`` then
sizes only data held in memory. With ``batch_loader(views=..., decode_device=device)``
(``train.decode=gpu``) the workers only read each file and draw its boxes, and the batch's JPEGs
are decoded and cut on ``device`` (:mod:`twist.data.device_decode`; non-JPEGs and files the
device decoder refuses take the CPU path per image; not yet run on a GPU in this project). A
streamed file that fails to decode (e.g. a truncated JPEG, or a file removed since) never
stops an epoch, under either policy: its slot in the batch gets a copy of the previous good image
of the same batch (the next one when it is first); the file is added to ``skipped`` once, the
count ``replaced`` grows, and a warning is logged. If no image of a batch decodes, up to 64 other
images of the dataset are tried before a :class:`DataError`.

A folder's (or a shard set's) ``dataset.paths`` is a :class:`PathTable`: the paths in one
buffer, read without writing to shared memory, so forked ``DataLoader`` workers do not each copy
the list as they read it (a list of ``str`` cost each worker about 113 bytes per image over an
epoch); it behaves as a read-only sequence of ``str``.

Batches
-------
``batch_loader`` draws one permutation per ``(seed, epoch)`` from a ``torch.Generator`` (seed
``seed * 1000003 + epoch``); rank ``r`` of ``world_size`` takes ``perm[r::world_size]``
(``DistributedSampler`` semantics). With ``drop_last`` the permutation is first cut to a multiple
of ``world_size`` and each rank's incomplete last batch is dropped, so every rank gets the same
number of full batches. Without ``drop_last`` the permutation is padded by wrapping around to a
multiple of ``world_size``; a padded entry is yielded with the index ``-1 - i`` (``i`` the real
image index) so that evaluation can drop duplicates: see :func:`padding_mask` and
:func:`real_indices`. With one process nothing is ever padded.
"""

from twist.data.crops import ViewPlan
from twist.data.dataset import DataError, ImageDataset
from twist.data.decode import display_path
from twist.data.folder import IMAGE_EXTENSIONS
from twist.data.listing import Listing
from twist.data.loader import BatchLoader, batch_loader, padding_mask, real_indices
from twist.data.paths import PathTable
from twist.data.sources import load_dataset

__all__ = [
    "DataError",
    "ViewPlan",
    "ImageDataset",
    "BatchLoader",
    "load_dataset",
    "batch_loader",
    "padding_mask",
    "real_indices",
    "display_path",
    "IMAGE_EXTENSIONS",
    "Listing",
    "PathTable",
]

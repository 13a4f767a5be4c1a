# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""DICOM for Qilin-Med-VL: recognising DICOM files, reading a dataset (with or without the Part 10 preamble), and
windowing one frame to 8-bit values the way a radiologist's viewer shows it (Modality LUT, then the file's VOI LUT or
window, MONOCHROME1 inverted; enhanced multi-frame functional groups; YBR and palette colour).

Remote code: copied next to checkpoints; imports only the standard library and numpy at module level. pydicom is an
optional extra, imported inside the functions that need it.
"""

import logging
import os
from typing import TYPE_CHECKING

import numpy as np

from .image_checks_qilin import ImageLoadingError, check_frame_argument, check_image_size, scale_to_uint8

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["DICOM_SUFFIXES", "dicom_dataset_to_uint8", "dicom_to_uint8", "is_dicom_file", "read_dicom_dataset"]

logger = logging.getLogger(__name__)

PYDICOM_MISSING_MESSAGE = "Reading DICOM needs pydicom: pip install 'qilin-med-vl[dicom]'"

DICOM_SUFFIXES = (".dcm", ".dicom")
# Lower and upper percentile of the fallback window for grayscale DICOM without a VOI LUT or window. Clipping the
# extreme 0.5% on each side keeps a few very bright (metal, contrast) or very dark (air, padding) pixels from
# squashing the tissue into a handful of grey levels.
FALLBACK_WINDOW_PERCENTILES = (0.5, 99.5)
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Functional-group macros of enhanced multi-frame objects (Enhanced CT/MR/XA...) that carry, per frame or shared,
# the rescale and window that a classic single-frame file keeps at the top level.
_FRAME_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def is_dicom_file(path: str | os.PathLike) -> bool:
    """
    Whether `path` is an existing file that should be read as DICOM: it has the "DICM" magic at byte offset 128
    (Part 10 files) or a `.dcm` / `.dicom` suffix (raw datasets without preamble exist, and are named that way).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    if has_dicom_suffix(path):
        return True
    return has_dicom_magic(path)


def read_dicom_dataset(path: str, headerless_only: bool = False) -> "Dataset | None":
    """The dataset in the local file `path`, read with pydicom.

    Files without the 128-byte preamble (raw datasets, as some PACS exports and older tools write them) are read with
    `force=True`, which also "reads" files that are not DICOM at all: such a result only counts if it describes an
    image (pixel data, rows and columns). With `headerless_only` (a file neither PIL nor its name says is DICOM),
    returns None instead of raising when the file is not DICOM image data, or when pydicom is not installed.

    Raises:
        `ImportError`: pydicom is not installed (unless `headerless_only`).
        `ImageLoadingError`: the file is not a readable DICOM image (unless `headerless_only`).
    """
    try:
        pydicom = _import_pydicom()
    except ImportError:
        if headerless_only:
            return None
        raise
    dataset = None
    if not headerless_only:
        try:
            return pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            pass
        except Exception as error:
            raise ImageLoadingError(f"{path}: not a readable DICOM file ({error})", path=path) from error
    try:
        dataset = pydicom.dcmread(path, force=True)
    except Exception as error:
        if headerless_only:
            return None
        raise ImageLoadingError(f"{path}: not a readable DICOM file ({error})", path=path) from error
    if _describes_an_image(dataset):
        return dataset
    if headerless_only:
        return None
    raise ImageLoadingError(
        f"{path}: not a DICOM image (no 'DICM' preamble and no pixel data could be read)", path=path)


def _describes_an_image(dataset: "Dataset") -> bool:
    return any(keyword in dataset for keyword in _PIXEL_DATA_KEYWORDS) and "Rows" in dataset and "Columns" in dataset


def dicom_to_uint8(ds: "Dataset", frame: int | None = None) -> np.ndarray:
    """
    Decode one frame of a DICOM dataset to display-ready 8-bit values. A display path can call this to show exactly
    what the model receives.

    Grayscale (MONOCHROME1/2): the Modality LUT (or Rescale Slope/Intercept) is applied, then the VOI LUT Sequence or
    the first Window Center/Width (`pydicom.pixels.apply_voi_lut`); without either, a window from the 0.5th to the
    99.5th percentile of the frame (ignoring Pixel Padding Value). The window's output range maps linearly to 0..255,
    and MONOCHROME1 is inverted afterwards so that dense tissue is bright. Enhanced multi-frame objects take rescale
    and window from their shared or per-frame functional groups.

    Colour: YBR is converted to RGB (once: pydicom's decoder already does it), PALETTE COLOR is looked up, and more
    than 8 bits stored are scaled down to 8.

    Args:
        ds (`pydicom.dataset.Dataset`):
            Dataset with pixel data. It is not modified.
        frame (`int`, *optional*):
            0-based frame; required when the dataset has more than one frame, and only `0` is valid otherwise.

    Returns:
        `np.ndarray`: `uint8` of shape `(Rows, Columns)` for grayscale or `(Rows, Columns, 3)` for colour.
    """
    check_frame_argument(frame)
    _import_pydicom()
    return dicom_dataset_to_uint8(ds, frame, name=_dataset_name(ds))


def has_dicom_suffix(path: str) -> bool:
    return path.lower().endswith(DICOM_SUFFIXES)


def has_dicom_magic(path: str) -> bool:
    try:
        with open(path, "rb") as file:
            file.seek(128)
            return file.read(4) == b"DICM"
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------------------------


def _import_pydicom():
    try:
        import pydicom
        import pydicom.errors
        import pydicom.pixels
    except ImportError as error:
        raise ImportError(PYDICOM_MISSING_MESSAGE) from error
    return pydicom


_IN_MEMORY_DATASET = "DICOM dataset"


def _dataset_name(ds: "Dataset") -> str:
    # A dataset read from disk remembers its file, so errors from `dicom_to_uint8` can still name it.
    filename = getattr(ds, "filename", None)
    return os.fspath(filename) if isinstance(filename, (str, os.PathLike)) else _IN_MEMORY_DATASET


def _path_of(name: str) -> str | None:
    return None if name == _IN_MEMORY_DATASET else name


def dicom_dataset_to_uint8(ds: "Dataset", frame: int | None, name: str) -> np.ndarray:
    if not any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
        raise ImageLoadingError(
            f"{name}: the DICOM file has no pixel data (no PixelData element); it is not an image "
            f"(SOP Class: {getattr(ds.get('SOPClassUID'), 'name', 'unknown')})",
            path=_path_of(name),
        )
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    except (TypeError, ValueError):
        rows = columns = 0
    if rows and columns:  # checked before decoding: a forged header must not make pydicom allocate gigabytes
        check_image_size(columns, rows, name=name if name != _IN_MEMORY_DATASET else "the DICOM dataset")
    num_frames = _number_of_frames(ds)
    index = _resolve_dicom_frame(frame, num_frames, name)
    view = _frame_view(ds, index, name)
    pixels, photometric = _decode_frame(view, index, name)

    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(pixels, view)
        return _colour_to_uint8(rgb, max_value=np.iinfo(rgb.dtype).max)
    if pixels.ndim == 2:
        return _grayscale_to_uint8(pixels, view, photometric, name)
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        if photometric in ("YBR_FULL", "YBR_FULL_422"):
            # pydicom 3's decoders convert YBR_FULL(_422) to RGB themselves and then report "RGB"; only convert if
            # this pydicom did not, so the colour transform is never applied twice.
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        bits_stored = int(view.get("BitsStored") or pixels.dtype.itemsize * 8)
        return _colour_to_uint8(pixels, max_value=2**bits_stored - 1)
    raise ImageLoadingError(
        f"{name}: unsupported DICOM pixel layout (shape {pixels.shape}, Photometric Interpretation {photometric!r})",
        path=_path_of(name),
    )


def _number_of_frames(ds: "Dataset") -> int:
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def _resolve_dicom_frame(frame: int | None, num_frames: int, name: str) -> int:
    path = _path_of(name)
    if num_frames > 1:
        if frame is None:
            raise ImageLoadingError(
                f"{name}: the file has {num_frames} frames; pass frame=... (0 to {num_frames - 1}) to choose one",
                path=path,
            )
        if not 0 <= frame < num_frames:
            raise ImageLoadingError(
                f"{name}: frame={frame} is out of range, the file has {num_frames} frames (valid: 0 to "
                f"{num_frames - 1})",
                path=path,
            )
        return int(frame)
    if frame not in (None, 0):
        raise ImageLoadingError(f"{name}: frame={frame} was given but the file has a single frame", path=path)
    return 0


def _frame_view(ds: "Dataset", index: int, name: str) -> "Dataset":
    """
    A new dataset holding what decoding and windowing frame `index` needs: the Image Pixel, Modality LUT and VOI LUT
    attributes (all in group 0x0028), the pixel data (group 0x7FE0), and for enhanced multi-frame objects the shared
    then per-frame functional-group values of Pixel Value Transformation and Frame VOI LUT lifted to the top level,
    where pydicom's `apply_*` functions look for them. Working on a view leaves the caller's dataset untouched.
    """
    from pydicom.dataset import Dataset, FileMetaDataset

    view = Dataset()
    for element in ds:
        if element.tag.group in (0x0028, 0x7FE0):
            view.add(element)

    groups = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        for macro in _FRAME_MACROS:
            items = group.get(macro)
            if items:
                for element in items[0]:
                    if element.tag.group == 0x0028:
                        view.add(element)

    view.file_meta = FileMetaDataset()
    view.file_meta.TransferSyntaxUID = _transfer_syntax(ds, name)
    return view


def _transfer_syntax(ds: "Dataset", name: str):
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if transfer_syntax:
        return transfer_syntax
    # Raw datasets (no file meta) are native-encoded; the encoding they were read with tells which syntax.
    implicit_vr, little_endian = getattr(ds, "original_encoding", (None, None))
    if implicit_vr is True and little_endian is True:
        return ImplicitVRLittleEndian
    if implicit_vr is False:
        return ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian
    raise ImageLoadingError(
        f"{name}: the DICOM dataset has no Transfer Syntax UID (0002,0010), so its pixel data cannot be decoded",
        path=_path_of(name),
    )


def _decode_frame(view: "Dataset", index: int, name: str) -> tuple[np.ndarray, str]:
    """Frame `index` as stored (after YBR->RGB where pydicom does it) and the Photometric Interpretation it now has."""
    from pydicom.pixels import get_decoder

    path = _path_of(name)
    transfer_syntax = view.file_meta.TransferSyntaxUID
    syntax = f"{transfer_syntax.name} ({transfer_syntax})"
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as error:
        raise ImageLoadingError(
            f"{name}: pixel data uses the Transfer Syntax {syntax}, which pydicom cannot decode", path=path
        ) from error
    if not decoder.is_available:
        options = "; ".join(decoder.missing_dependencies) or "see the pydicom documentation"
        raise ImageLoadingError(
            f"{name}: pixel data is compressed with the Transfer Syntax {syntax} and no decoder for it is "
            f"installed ({options})",
            path=path,
        )
    try:
        pixels, meta = decoder.as_array(view, index=index)
    except Exception as error:
        raise ImageLoadingError(f"{name}: could not decode the {syntax} pixel data: {error}", path=path) from error
    photometric = str(meta.get("photometric_interpretation") or view.get("PhotometricInterpretation") or "")
    return pixels, photometric.strip().upper()


def _grayscale_to_uint8(pixels: np.ndarray, view: "Dataset", photometric: str, name: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(pixels, view)
    output_range = _voi_output_range(view) if photometric in _MONOCHROME else None
    windowed = None
    if output_range is not None:
        if output_range[2] == "lut" and values.dtype.kind == "f" and np.array_equal(values, np.round(values)):
            # A rescale with integral slope/intercept gives whole-number floats; a VOI LUT indexes with integers.
            values = values.astype(np.int64)
        try:
            windowed = apply_voi_lut(values, view, index=0)
        except (ValueError, NotImplementedError, IndexError, AttributeError) as error:
            # Broken window headers (Window Width 0, odd LUT depth) are common in the wild; a percentile window
            # still gives a readable image.
            logger.warning("%s: ignoring unusable VOI LUT / window (%s); using a percentile window", name, error)
    if windowed is not None:
        low, high = output_range[0], output_range[1]
    else:
        windowed = values.astype(np.float64)
        low, high = _percentile_window(windowed, pixels, view)
    result = scale_to_uint8(np.asarray(windowed, dtype=np.float64), low, high)
    if photometric == "MONOCHROME1":
        # MONOCHROME1 stores dense tissue as low values; invert after windowing so bone is bright, as displayed.
        result = 255 - result
    return result


def _voi_output_range(view: "Dataset") -> tuple[float, float, str] | None:
    """
    The values `apply_voi_lut` maps the bottom and top of the window to, mirroring its choice (VOI LUT Sequence
    first, then Window Center/Width), or `None` when the dataset defines neither.
    """
    voi_sequence = view.get("VOILUTSequence")
    if voi_sequence and None not in (voi_sequence[0].get("LUTDescriptor"), voi_sequence[0].get("LUTData")):
        # PS3.3 C.11.2.1.1: the LUT's output range is 0 to 2**bits - 1, bits being the descriptor's third value.
        return 0.0, float(2 ** int(voi_sequence[0].LUTDescriptor[2]) - 1), "lut"
    if view.get("WindowCenter") is None or view.get("WindowWidth") is None:
        return None
    # PS3.3 C.11.2.1.2: windowing outputs y_min below the window and y_max above it, the range of the input to the
    # VOI stage: the Modality LUT's output range, else the stored range taken through the rescale.
    modality_lut = view.get("ModalityLUTSequence")
    bits_stored = int(view.get("BitsStored") or 16)
    if modality_lut:
        y_min, y_max = 0.0, float(2 ** int(modality_lut[0].LUTDescriptor[2]) - 1)
    elif view.get("PixelRepresentation", 0) == 0:
        y_min, y_max = 0.0, float(2**bits_stored - 1)
    else:
        y_min, y_max = float(-(2 ** (bits_stored - 1))), float(2 ** (bits_stored - 1) - 1)
    slope, intercept = view.get("RescaleSlope"), view.get("RescaleIntercept")
    if not modality_lut and slope is not None and intercept is not None:
        y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
    # With a negative slope y_min > y_max; keeping the order (not sorting) keeps "below the window" dark.
    return y_min, y_max, "window"


def _percentile_window(values: np.ndarray, stored: np.ndarray, view: "Dataset") -> tuple[float, float]:
    # CT padding (often -2000 or -3024 outside the reconstruction circle) is not anatomy; leave it out of the
    # statistics or it would drag the lower bound down to the padding value.
    mask = _padding_mask(stored, view)
    sample = values[~mask] if mask is not None and not mask.all() else values
    low, high = (float(v) for v in np.percentile(sample, FALLBACK_WINDOW_PERCENTILES))
    if high <= low:
        # Mostly constant images (masks, 1-bit overlays): fall back to the full range.
        low, high = float(sample.min()), float(sample.max())
    return low, high


def _padding_mask(stored: np.ndarray, view: "Dataset") -> np.ndarray | None:
    padding = view.get("PixelPaddingValue")
    if padding is None:
        return None
    limit = view.get("PixelPaddingRangeLimit")
    if limit is None:
        return stored == padding
    low, high = sorted((int(padding), int(limit)))
    return (stored >= low) & (stored <= high)


def _colour_to_uint8(pixels: np.ndarray, max_value: int) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    # Colour is absolute (no window): scale the nominal range, not the image's own min/max.
    return scale_to_uint8(pixels.astype(np.float64), 0.0, float(max_value))

"""Turning an image file into the 8-bit greyscale picture every other module works on.

One decoder for training, evaluation, caching and GradCAM, so all of them see the same pixels.
PNG, JPEG, TIFF and the like go through Pillow; DICOM (.dcm, or any file that is DICOM, old
ACR-NEMA files included) through pydicom, with the file's own display transforms.

Wider than 8 bits, black and white are, in this order: the file's VOI LUT or window (DICOM);
the bits stored when the header states fewer than the container holds (8-bit DICOM, a 12-bit
TIFF); otherwise, for every 16-bit PNG or TIFF alike, a robust window from the 0.5th to the
99.5th percentile. Never a rule chosen by an image's own values: one that crossed 2**15 would
decode darker than the same picture just below it, a brightness shortcut for whichever scanner
or class tends to cross it. Error messages name the file and never quote DICOM header values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageOps

from .config import CLAHE

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
DICOM_EXTENSIONS = {".dcm", ".dicom"}
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # more than 8 bits per pixel
ROBUST_PERCENTILES = (0.5, 99.5)
# Part of every cache and scan key: bump it when load_xray's pixels change (the Pillow version too can).
DECODER_VERSION = f"3-pillow{PIL.__version__}"


class DicomDecodeError(Exception):
    """A DICOM file that cannot become a greyscale picture; the message names the file, never header values.

    Not a ValueError: the DICOM reader turns pydicom's ValueErrors into this one and lets this one through."""


# Errors that mean "this file is not a usable image" (Pillow raises the first four).
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, DicomDecodeError)


def is_image_file(path: str | Path) -> bool:
    """An image by its extension, or a DICOM file; hidden files (.DS_Store) and DICOMDIR indexes never are."""
    path = Path(path)
    if path.name.startswith(".") or path.name.upper() == "DICOMDIR":  # DICOMDIR: a CD's index, no picture
        return False
    return path.suffix.lower() in IMAGE_EXTENSIONS or is_dicom_file(path)


def is_dicom_file(path: str | Path) -> bool:
    """.dcm/.dicom, a file with the DICOM preamble, or (without an extension) an ACR-NEMA image."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_EXTENSIONS:
        return True
    if suffix in IMAGE_EXTENSIONS:
        return False
    try:
        with open(path, "rb") as f:
            if f.read(132)[128:] == b"DICM":
                return True
    except OSError:  # a file we cannot open is not one we can list as an image
        return False
    # Files named by their UID ("1.2.840...1") end in digits; the ACR-NEMA parse is for those only.
    return (suffix == "" or suffix[1:].isdigit()) and _is_acr_nema_image(path)


def _is_acr_nema_image(path: Path) -> bool:
    """Old ACR-NEMA files have no preamble: parse the header and look for an image's size."""
    import pydicom

    try:  # defer_size: long values (junk read as lengths) are skipped, not read
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True, defer_size=1024)
    except _pydicom_failures():  # not parseable as DICOM, so not DICOM
        return False
    return "Rows" in ds and "Columns" in ds


def equalise(pixels: np.ndarray, clip_limit: float = CLAHE["clip_limit"], tile_grid=CLAHE["tile_grid"]) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a uint8 greyscale image (H, W) or batch (B, H, W):
    local contrast evened out, so radiographs exposed and processed differently look more alike."""
    import cv2

    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=tuple(tile_grid))
    if pixels.ndim == 3:
        return np.stack([clahe.apply(np.ascontiguousarray(image)) for image in pixels])
    return clahe.apply(np.ascontiguousarray(pixels, dtype=np.uint8))


def load_xray(path: str | Path) -> Image.Image:
    """Decode an X-ray as 8-bit greyscale, whatever its format, stored mode or bit depth.

    Every image goes through greyscale first: the Kaggle set stores Normal cases as RGB
    and TB cases as greyscale, so the raw mode alone would give the label away.
    """
    if is_dicom_file(path):
        return Image.fromarray(load_dicom_pixels(path))
    with Image.open(path) as img:
        tiff_bits = _tiff_bits_stored(img)  # before exif_transpose, whose copy has no TIFF tags
        img = ImageOps.exif_transpose(img)
        if img.mode in WIDE_MODES:
            # Pillow's convert("L") would clip everything above 255 to white.
            return Image.fromarray(_wide_to_uint8(np.asarray(img, dtype=np.float64), tiff_bits))
        return img.convert("L")


def _tiff_bits_stored(img: Image.Image) -> int | None:
    """BitsPerSample of a TIFF narrower than 16 bits: Pillow unpacks those to 16-bit samples."""
    bits = getattr(img, "tag_v2", {}).get(258)  # 258 = BitsPerSample
    bits = bits[0] if isinstance(bits, tuple) else bits
    return bits if bits and 8 < bits < 16 else None


def _wide_to_uint8(values: np.ndarray, tiff_bits: int | None) -> np.ndarray:
    if tiff_bits:
        return _to_uint8(values, 0, 2**tiff_bits - 1)
    # A 16-bit container does not say how many bits the detector filled (a 12-bit radiograph is often
    # written into a 16-bit PNG as is), and Pillow does not read PNG's sBIT: the same window for all.
    return _to_uint8(values, *np.percentile(values, ROBUST_PERCENTILES))


def _to_uint8(values: np.ndarray, black: float, white: float) -> np.ndarray:
    """Map black..white linearly onto 0..255 (white below black inverts), rounding half up, clipping outside."""
    if white == black:  # a window of no width is a step
        return np.where(values > black, 255, 0).astype(np.uint8)
    return np.clip((values - black) * (255.0 / (white - black)) + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- DICOM
def _pydicom_failures() -> tuple[type[BaseException], ...]:
    """What pydicom raised on 2,400 damaged copies (truncated, bytes changed) of the real hospital DICOMs."""
    import struct

    from pydicom.errors import BytesLengthException

    failures = (ValueError, RuntimeError, NotImplementedError, AttributeError, TypeError, OSError)
    return (*failures, BytesLengthException, struct.error)


def load_dicom_pixels(path: str | Path) -> np.ndarray:
    """One greyscale DICOM frame as displayed: modality LUT, then VOI, to uint8; MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut

    try:
        ds = _read_dicom(path)
        values = apply_modality_lut(_stored_pixels(ds, path), ds)
        black, white, values = _voi(ds, values)
        monochrome1 = ds.PhotometricInterpretation == "MONOCHROME1"
    except _pydicom_failures() as exc:
        # pydicom's own message may quote header values; the type tells what went wrong.
        raise DicomDecodeError(f"{path}: damaged or unsupported DICOM file ({type(exc).__name__})") from exc
    pixels = _to_uint8(values, black, white)
    # MONOCHROME1 stores the inverse (air white); invert after the modality and VOI transforms.
    return 255 - pixels if monochrome1 else pixels


def _read_dicom(path: str | Path):
    """The dataset of a single-frame greyscale image; DicomDecodeError for anything else."""
    import pydicom

    ds = pydicom.dcmread(path, force=True)  # force: ACR-NEMA files have no preamble
    if "PhotometricInterpretation" not in ds and ds.get("SamplesPerPixel", 1) == 1:
        ds.PhotometricInterpretation = "MONOCHROME2"  # old ACR-NEMA files may omit it: greyscale, black is 0
    if "PixelData" not in ds:
        raise DicomDecodeError(f"{path}: DICOM object without pixel data (not an image)")
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise DicomDecodeError(f"{path}: multi-frame DICOM; only single-frame radiographs are supported")
    if ds.get("SamplesPerPixel", 1) != 1 or ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomDecodeError(f"{path}: colour DICOM; only greyscale (MONOCHROME1/2) radiographs are supported")
    return ds


def _stored_pixels(ds, path: str | Path) -> np.ndarray:
    """The stored values, through the pixel-data handler for the file's transfer syntax."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" not in ds.file_meta:  # ACR-NEMA: no file meta; use the encoding it was read with
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    syntax = ds.file_meta.TransferSyntaxUID
    # Transfer syntax names are public (UID dictionary), never patient data; unknown UIDs are not quoted.
    known = not syntax.is_private and syntax.is_transfer_syntax
    syntax_name = syntax.name if known else "an unknown transfer syntax"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise DicomDecodeError(f"{path}: pydicom has no pixel-data decoder for {syntax_name}") from exc
    if not decoder.is_available:
        needs = "; or ".join(decoder.missing_dependencies) or "a pixel-data plugin"
        raise DicomDecodeError(f"{path}: no pixel-data decoder installed for {syntax_name} (needs {needs})")
    try:
        return ds.pixel_array
    except _pydicom_failures() as exc:
        raise DicomDecodeError(f"{path}: DICOM pixel data cannot be decoded ({type(exc).__name__})") from exc


def _voi(ds, values: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(black, white, values after the VOI transform): apply_voi_lut's two halves, called apart so
    black and white come from the same transform. Without one, 8 bits as stored, else robust."""
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    lut = ds.get("VOILUTSequence")
    if lut and "LUTDescriptor" in lut[0] and "LUTData" in lut[0]:  # apply_voi_lut's test
        entries, first = lut[0].LUTDescriptor[0] or 2**16, lut[0].LUTDescriptor[1]
        # Black and white are the table's own extremes: many tables use fewer bits than declared.
        table = apply_voi(np.arange(first, first + entries), ds)
        # Integer indices inside the table (pydicom warns on floats, and its uint16 index would wrap).
        indices = np.clip(np.rint(values), first, first + entries - 1).astype(np.int64)
        return float(table.min()), float(table.max()), apply_voi(indices, ds)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        black, white = apply_windowing(np.array([-np.inf, np.inf]), ds)  # the window's output range
        return black, white, apply_windowing(values, ds)
    if ds.BitsStored == 8 and ds.PixelRepresentation == 0:
        # 8-bit DICOM (often a PNG or JPEG wrapped) shows as stored, exactly as the same 8-bit PNG would.
        black, white = apply_modality_lut(np.array([0, 255]), ds)
        return float(black), float(white), values
    return *np.percentile(values, ROBUST_PERCENTILES), values

"""Decoding what hospitals export: DICOM (windowed, inverted, compressed, ACR-NEMA) and PNG/TIFF
wider than 8 bits, checked against hand-computed pixels; patient data never reaches any output."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from conftest import coloured_share, shared_data
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import MPEG4HP41, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

import resnet50_gradcam_tb_full as gradcam
import resnet50_tb_full as trainer
from tbcxr.checkpoint import Checkpoint
from tbcxr.config import CLASS_NAMES, MANIFEST_NAME
from tbcxr.data_quality import scan_images
from tbcxr.decoding import DicomDecodeError, load_xray
from tbcxr.demo import synthetic_xray
from tbcxr.errors import ImageReadError
from tbcxr.explain import ExplainedImages
from tbcxr.layout import list_images
from tbcxr.model import build_model

PATIENT_NAME, PATIENT_ID = "Zyxwvut^Quinella", "ZQX-4711-PID"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def dicom_dataset(pixels: np.ndarray, photometric="MONOCHROME2", bits=12, window=None, rescale=None) -> Dataset:
    """A single-frame greyscale DX image that carries patient identifiers, as a hospital's would."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"  # explicit VR little endian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = PATIENT_NAME, PATIENT_ID, "DX"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16 if bits > 8 else 8, bits, bits - 1, 0
    ds.PixelData = pixels.astype(np.uint16 if bits > 8 else np.uint8).tobytes()
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    return ds


def save(ds: Dataset, path):
    ds.save_as(path, enforce_file_format=True)
    return path


def decoded(path) -> np.ndarray:
    image = load_xray(path)
    assert image.mode == "L"
    return np.asarray(image)


# Stored values and their display through window centre 1500, width 1001 (LINEAR: c = 1499.5, w = 1000;
# black at or below 999.5, white above 1999.5, else round(((v - c) / w + 0.5) * 255)). The window sits
# off the middle of the 12-bit range, so inverting before the VOI transform would give other values.
WINDOWED = {
    500: 0,  # below the window
    1000: 0,  # (0.0005) * 255 = 0.13
    1250: 64,  # (0.2505) * 255 = 63.88
    1500: 128,  # (0.5005) * 255 = 127.63
    1700: 179,  # (0.7005) * 255 = 178.63
    1999: 255,  # (0.9995) * 255 = 254.87
    3000: 255,  # above the window
}


def lookup_image(table: dict[int, int], shape=(4, 7)) -> tuple[np.ndarray, np.ndarray]:
    """Stored values cycling through the table's keys, and the display values expected for them."""
    keys = np.resize(np.array(list(table)), shape)
    return keys, np.vectorize(table.get)(keys).astype(np.uint8)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize(
    "window, rescale",
    [((1500, 1001), None), ((2000, 2001), (2, -1000))],  # with rescale, 2v - 1000 meets the same window
    ids=["window", "rescale+window"],
)
def test_12bit_dicom_window_rescale_and_monochrome1(tmp_path, photometric, window, rescale):
    stored, display = lookup_image(WINDOWED)
    path = save(dicom_dataset(stored, photometric, window=window, rescale=rescale), tmp_path / "x.dcm")
    expected = display if photometric == "MONOCHROME2" else 255 - display  # MONOCHROME1 stores air white
    np.testing.assert_array_equal(decoded(path), expected)


# 1,000 pixels: 2 outliers at each end (0.2%), then 10 at 100 and 10 at 3100, which hold the 0.5th and
# 99.5th percentiles, so the window is 100..3100: round((v - 100) * 255 / 3000), clipped.
ROBUST = {0: 0, 100: 0, 1100: 85, 1650: 132, 2345: 191, 3100: 255, 4095: 255}  # 1100: 85.0, 1650: 131.75


def percentile_image() -> np.ndarray:
    middle = np.resize([1100, 1650, 2345], 976)
    return np.concatenate([[0, 0], [100] * 10, middle, [3100] * 10, [4095] * 2]).reshape(40, 25)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_12bit_dicom_without_window_uses_the_robust_percentile_window(tmp_path, photometric):
    stored = percentile_image()
    path = save(dicom_dataset(stored, photometric), tmp_path / "x.dcm")
    expected = np.vectorize(ROBUST.get)(stored).astype(np.uint8)  # plain min-max would give 1100 -> 69
    np.testing.assert_array_equal(decoded(path), expected if photometric == "MONOCHROME2" else 255 - expected)


def test_voi_lut_sequence_wins_over_the_window_and_uses_its_own_range(tmp_path):
    stored, _ = lookup_image({0: 0, 1000: 0, 2048: 0, 3001: 0, 4095: 0})
    ds = dicom_dataset(stored, window=(100, 10))  # a window too, which apply_voi_lut ranks below the LUT
    lut = Dataset()
    lut.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: 4096 entries from 0, "16 bits"
    lut.add_new(0x00283006, "US", [v // 2 for v in range(4096)])  # LUT Data: 0..2047, so 11 bits used
    ds.VOILUTSequence = Sequence([lut])
    # v -> v // 2, then 0..2047 (the table's extremes, not 0..65535) onto 0..255.
    expected = {0: 0, 1000: 62, 2048: 128, 3001: 187, 4095: 255}  # 500 -> 62.29, 1024 -> 127.56, 1500 -> 186.86
    np.testing.assert_array_equal(decoded(save(ds, tmp_path / "x.dcm")), np.vectorize(expected.get)(stored))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_8bit_dicom_without_window_shows_as_stored_like_the_same_png(tmp_path, photometric):
    pixels = synthetic_xray(np.random.default_rng(3), 48, tuberculosis=True)
    stored = pixels if photometric == "MONOCHROME2" else 255 - pixels
    path = save(dicom_dataset(stored, photometric, bits=8), tmp_path / "x.dcm")
    Image.fromarray(pixels).save(tmp_path / "x.png")
    np.testing.assert_array_equal(decoded(path), pixels)
    np.testing.assert_array_equal(decoded(path), decoded(tmp_path / "x.png"))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_dicom_decodes_through_the_pixel_data_handlers(tmp_path, syntax):
    stored, display = lookup_image(WINDOWED, shape=(64, 64))  # OpenJPEG's default resolutions need 64 x 64
    ds = dicom_dataset(stored, "MONOCHROME1", window=(1500, 1001))
    ds.compress(syntax)
    path = save(ds, tmp_path / "x.dcm")
    assert path.read_bytes().count(stored.astype(np.uint16).tobytes()) == 0  # really stored compressed
    np.testing.assert_array_equal(decoded(path), 255 - display)


def write_16bit_png(pixels: np.ndarray, path):
    Image.fromarray(pixels.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"


def write_12bit_tiff(pixels: np.ndarray, path):
    """A greyscale TIFF with BitsPerSample 12 (two pixels in three bytes), which Pillow cannot write."""
    rows, cols = pixels.shape
    data = b""
    for row in pixels:
        bits = "".join(f"{int(v):012b}" for v in row)
        bits += "0" * (-len(bits) % 8)  # each row starts on a byte
        data += int(bits, 2).to_bytes(len(bits) // 8, "big")
    tags = [(256, cols), (257, rows), (258, 12), (259, 1), (262, 1), (273, 0), (277, 1), (278, rows), (279, len(data))]
    offset = 8 + 2 + 12 * len(tags) + 4
    ifd = b"".join(struct.pack("<HHII", tag, 4, 1, offset if tag == 273 else value) for tag, value in tags)
    path.write_bytes(b"II*\x00" + struct.pack("<IH", 8, len(tags)) + ifd + struct.pack("<I", 0) + data)
    assert Image.open(path).mode == "I;16"


# The percentile image again, as 16-bit PNG and 12-bit TIFF. A 12-bit TIFF says so: v / 4095. A 16-bit
# PNG never says how many of its bits are used: the robust window, whether its values reach 2**15 or not.
BY_BITS = {0: 0, 100: 6, 1100: 68, 1650: 103, 2345: 146, 3100: 193, 4095: 255}  # 1100: 68.498, 3100: 193.04


@pytest.mark.parametrize(
    "case, scale, expected",
    [("png", 1, ROBUST), ("png", 16, ROBUST), ("tiff", 1, BY_BITS)],
    ids=["12-bit values in a 16-bit PNG", "values past 2**15 in a 16-bit PNG", "12-bit TIFF"],
)
def test_wide_png_and_tiff_use_the_stored_bits_or_the_robust_window(tmp_path, case, scale, expected):
    stored = percentile_image()
    path = tmp_path / f"x.{case}"
    (write_16bit_png if case == "png" else write_12bit_tiff)(stored * scale, path)
    np.testing.assert_array_equal(decoded(path), np.vectorize(expected.get)(stored))


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_the_same_16bit_picture_decodes_alike_with_its_maximum_below_or_above_2_to_the_15(tmp_path, suffix):
    picture = synthetic_xray(np.random.default_rng(5), 64, tuberculosis=True).astype(np.float64)
    shown = []
    for peak in (29_657, 33_611):  # one image below 2**15, the same content just above it
        path = tmp_path / f"peak{peak}.{suffix}"
        Image.fromarray(np.rint(picture * (peak / picture.max())).astype(np.uint16)).save(path)
        assert Image.open(path).mode == "I;16"
        shown.append(decoded(path).astype(int))
    # A rule picked by the maximum decoded these at mean 127 and 66: a brightness shortcut for a scanner
    # or class that tends to cross 2**15. One rule leaves only rounding between them.
    assert np.abs(shown[0] - shown[1]).max() <= 1
    assert abs(shown[0].mean() - picture.mean()) < 40  # a visible picture, neither black nor white


# --------------------------------------------------------------------------- what is refused, and how
def unsupported(tmp_path, kind: str):
    """A DICOM file the reader must refuse, with the reason it must give."""
    pixels = np.full((8, 8), 1000)
    ds = dicom_dataset(pixels)
    if kind == "no decoder exists":
        ds.file_meta.TransferSyntaxUID = MPEG4HP41
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3 not really video"])
        reason = "pydicom has no pixel-data decoder for MPEG-4 AVC/H.264"
    elif kind == "decoder not installed":
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7 not really JPEG-LS"])
        reason = "no pixel-data decoder installed for JPEG-LS Lossless"
    elif kind == "multi-frame":
        ds.NumberOfFrames = 2
        ds.PixelData = np.concatenate([pixels, pixels]).astype(np.uint16).tobytes()
        reason = "multi-frame DICOM"
    elif kind == "damaged pixel data":
        ds.PixelData = ds.PixelData[:10]
        reason = "DICOM pixel data cannot be decoded (ValueError)"
    elif kind == "invalid window":
        ds.WindowCenter, ds.WindowWidth = 1000, 0  # LINEAR needs a width of at least 1
        reason = "damaged or unsupported DICOM file (ValueError)"
    elif kind == "colour":
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = np.zeros((8, 8, 3), np.uint8).tobytes()
        reason = "colour DICOM"
    else:  # a structured report, say: patient data but no picture
        del ds.PixelData
        reason = "without pixel data (not an image)"
    return save(ds, tmp_path / f"{kind.replace(' ', '_')}.dcm"), reason


KINDS = ["no decoder exists", "decoder not installed", "damaged pixel data", "invalid window", "multi-frame"]
KINDS += ["colour", "not an image"]


def assert_no_patient_data(*texts: str):
    for text in texts:
        assert PATIENT_NAME.split("^")[0] not in text and PATIENT_ID not in text


@pytest.mark.parametrize("kind", KINDS)
def test_bad_dicom_is_listed_unreadable_by_path_with_its_reason_never_patient_data(tmp_path, kind, monkeypatch, capsys):
    if kind == "decoder not installed":  # as without pylibjpeg-libjpeg: JPEG-LS's plugins all missing
        monkeypatch.setattr(type(get_decoder(JPEGLSLossless)), "is_available", property(lambda self: False))
    path, reason = unsupported(tmp_path, kind)

    with pytest.raises(DicomDecodeError) as error:
        load_xray(path)
    listed = scan_images([str(path)]).unreadable[str(path)]
    with pytest.raises(ImageReadError) as refused:  # GradCAM --images
        ExplainedImages([(str(path), 0)], lambda image: image)[0]

    assert str(path) in str(error.value) and reason in str(error.value)
    assert listed == f"DicomDecodeError: {error.value}"
    assert f"cannot read image {path}: " in str(refused.value) and reason in str(refused.value)
    console = capsys.readouterr()
    assert_no_patient_data(str(error.value), listed, str(refused.value), console.out, console.err)


# --------------------------------------------------------------------------- finding the files
def test_list_images_finds_dicom_with_and_without_extension_and_skips_junk(tmp_path):
    stored, _ = lookup_image(WINDOWED)
    for name in ("a.dcm", "IM00001", "scan.IMA"):  # by extension; by the DICM preamble without one
        save(dicom_dataset(stored), tmp_path / name)
    uid_name = "1.2.826.0.1.3680043.8.498.1"  # files named by their UID end in digits
    for name in ("ACRNEMA01", uid_name):  # old ACR-NEMA: no preamble, no file meta, implicit VR
        acr_nema = dicom_dataset(stored)
        del acr_nema.file_meta, acr_nema.PhotometricInterpretation  # which old files may omit
        acr_nema.save_as(tmp_path / name, implicit_vr=True, little_endian=True, enforce_file_format=False)
        assert (tmp_path / name).read_bytes()[:2] == b"\x08\x00"  # group 0008 first, no preamble
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "b.png")
    save(dicom_dataset(stored), tmp_path / "DICOMDIR")  # a CD's index: DICOM, never a picture
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(200))
    (tmp_path / ".hidden.dcm").write_bytes((tmp_path / "a.dcm").read_bytes())
    (tmp_path / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(300))
    (tmp_path / "labels.csv").write_text("file,label\n")
    (tmp_path / "README").write_text("Chest X-rays exported from the PACS.\n")
    (tmp_path / "notes.1").write_text("first batch\n")
    (tmp_path / "junk").write_bytes(b"\x08\x00" + np.random.default_rng(0).bytes(4000))  # looks like group 0008
    (tmp_path / "series").mkdir()

    found = [p.name for p in list_images(tmp_path)]

    assert found == sorted(["a.dcm", "IM00001", "scan.IMA", "ACRNEMA01", uid_name, "b.png"])
    for name in ("IM00001", "scan.IMA", "ACRNEMA01", uid_name):
        np.testing.assert_array_equal(decoded(tmp_path / name), decoded(tmp_path / "a.dcm"))


# --------------------------------------------------------------------------- real hospital files
REAL_DICOMS = {  # name -> (width, height), from ../shared/data/README.md
    "cr_rg1_mono1_15bit_j2k_lossy.dcm": (1841, 1955),
    "cr_mono1_10bit_acrnema_noext": (440, 440),
    "cr_mono2_8bit_jpeg_baseline.dcm": (1024, 1024),
    "dx_mono2_8bit_implicit_vr.dcm": (1024, 1024),
}


def test_real_hospital_dicoms_are_all_found():
    folder = shared_data("dicom-chest")
    assert sorted(p.name for p in list_images(folder)) == sorted(REAL_DICOMS)


@pytest.mark.parametrize("name", sorted(REAL_DICOMS))
def test_real_hospital_dicom_displays_lungs_dark_and_spine_bright(name):
    image = load_xray(shared_data("dicom-chest") / name)
    assert image.mode == "L" and image.size == REAL_DICOMS[name]
    pixels = np.asarray(image, dtype=float)
    h, w = pixels.shape
    rows = slice(int(0.35 * h), int(0.65 * h))
    spine = pixels[rows, int(0.45 * w) : int(0.55 * w)].mean()
    lungs = [pixels[rows, int(a * w) : int(b * w)].mean() for a, b in ((0.2, 0.3), (0.7, 0.8))]
    # Measured margins are 52 to 96 grey levels; an image shown inverted has the spine darker than both.
    assert spine > max(lungs) + 30, (spine, lungs)
    assert pixels.std() > 25  # a real picture, not a flat window (measured 39 to 54)


# --------------------------------------------------------------------------- the two scripts
def write_dicom_xray(path, pixels: np.ndarray):
    """An 8-bit picture as a 12-bit MONOCHROME1 DICOM whose window shows exactly that picture.

    Window 2048/4096 maps v onto v * 255 / 4095; stored = 4095 - round(p * 4095 / 255) gives p back
    (within 0.03 before rounding) once MONOCHROME1 is inverted."""
    stored = 4095 - np.rint(pixels * (4095 / 255))
    return save(dicom_dataset(stored, "MONOCHROME1", window=(2048, 4096)), path)


def test_trainer_trains_on_a_folder_of_dicom_files_and_writes_no_patient_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    for seed, (split, count) in enumerate((("train", 6), ("test", 3))):
        for label, name in enumerate(CLASS_NAMES):
            rng = np.random.default_rng(10 * seed + label)
            folder = data / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                suffix = "" if i == 0 else ".dcm"  # one extensionless file per folder
                write_dicom_xray(folder / f"img{i}{suffix}", synthetic_xray(rng, 40, name == "Tuberculosis"))
    colour, _ = unsupported(data / "train" / "Normal", "colour")

    trainer.main(
        ["--data-dir", str(data), "--checkpoint-dir", str(tmp_path / "ckpt")]
        + ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--epochs", "1"]
        + ["--image-size", "32", "--batch-size", "8", "--num-workers", "0", "--weights", "none", "--recipe", "original"]
    )

    manifest = json.loads((tmp_path / "ckpt" / MANIFEST_NAME).read_text())
    used = {rel for side in ("train", "val", "test") for rel, _ in manifest[side]}
    assert len(used) == 2 * (6 + 3) and "train/Normal/img0" in used  # every DICOM file, extensionless too
    assert [rel for rel, _ in manifest["unreadable"]] == ["train/Normal/colour.dcm"]
    console = capsys.readouterr()
    assert f"{colour}: colour DICOM" in console.err
    written = [p for p in tmp_path.rglob("*") if p.is_file() and data not in p.parents]
    assert any(p.suffix == ".pth" for p in written) and any(p.name == "mlflow.db" for p in written)
    for path in written:  # checkpoints, manifest, summary, MLflow store and artifacts
        content = path.read_bytes()
        assert PATIENT_NAME.split("^")[0].encode() not in content and PATIENT_ID.encode() not in content, path
    assert_no_patient_data(console.out, console.err)


def test_gradcam_renders_a_dicom_and_shows_the_same_picture_as_its_8bit_png(tmp_path, monkeypatch):
    pixels = synthetic_xray(np.random.default_rng(7), 64, tuberculosis=True)
    dicom = write_dicom_xray(tmp_path / "chest.dcm", pixels)
    Image.fromarray(pixels).save(tmp_path / "chest.png")
    np.testing.assert_array_equal(decoded(dicom), pixels)
    torch.manual_seed(0)
    model = build_model("none", freeze_features=False).eval()
    ckpt = tmp_path / "c.pth"
    Checkpoint.from_model(model, {"freeze_features": False, "image_size": 32}, 32).save(ckpt)
    shown, render = [], gradcam.render_explanation  # keep what each figure draws
    monkeypatch.setattr(gradcam, "render_explanation", lambda e, *args: render(shown.append(e) or e, *args))

    result = gradcam.main(
        ["--checkpoint", str(ckpt), "--images", str(dicom), str(tmp_path / "chest.png")]
        + ["--output-dir", str(tmp_path / "out"), "--device", "cpu"]
    )

    assert all(coloured_share(tmp_path / "out" / row["file"]) > 0.05 for row in result["images"])  # heatmaps drawn
    assert result["images"][0]["image"] == str(dicom)
    assert result["images"][0]["probability_tuberculosis"] == result["images"][1]["probability_tuberculosis"]
    from_dicom, from_png = shown
    assert from_dicom.path == str(dicom)
    np.testing.assert_array_equal(from_dicom.rgb, from_png.rgb)  # the "X-ray" panel of both figures

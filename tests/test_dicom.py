"""DICOM: the viewer's rules (modality LUT to Hounsfield units, CT window, the file's window for
X-rays, MONOCHROME1 inverted), files found without an extension, objects without an image counted
and not read, patients from PatientID, and a real search + finalize + predict on a folder that mixes
DICOM and PNG. Every file is built here with pydicom."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset as DicomDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from conftest import ROOT
from core.errors import UserError
from ingest.dataset import load_dataset
from ingest.image_file import decode_image


def _dicom(path, pixels: np.ndarray, *, modality="DX", photometric="MONOCHROME2", bits=16, slope=None,
           intercept=None, window=None, patient="", frames=1, syntax=ExplicitVRLittleEndian, preamble=True,
           **header):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = {"CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
                                    "SR": "1.2.840.10008.5.1.4.1.1.88.11"}.get(modality,  # Basic Text SR Storage
                                                                               "1.2.840.10008.5.1.4.1.1.1.1")  # DX
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = modality, patient
    for keyword, value in header.items():  # Manufacturer, PatientSex, PatientAge ...
        setattr(ds, keyword, value)
    if pixels is not None:
        stack = pixels if frames == 1 else np.stack([pixels] * frames)
        ds.set_pixel_data(stack, photometric, bits)
        if frames > 1:
            ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    if not preamble:
        ds.preamble = None
    ds.save_as(path, enforce_file_format=preamble)
    return path


def _ct(path, hu: np.ndarray, **kw):
    """A CT slice stored as unsigned 12-bit values with intercept -2048: the modality LUT gives back `hu`."""
    return _dicom(path, (hu + 2048).astype(np.uint16), modality="CT", bits=12, slope=1, intercept=-2048, **kw)


HU = np.array([[-1350, -600], [150, 2000]] * 8, np.int16).reshape(4, 8)  # below, at the centre of, above the lung window



def test_ct_is_read_in_hounsfield_units_through_the_lung_window(tmp_path):
    path = _ct(tmp_path / "slice.dcm", HU)
    lung = decode_image(path, image_size=8, channels=1)[..., 0]
    assert lung.dtype == np.uint8
    assert lung.min() == 0 and lung.max() == 255  # -1350 HU and 150 HU lie outside -600 +- 750
    mid = decode_image(_ct(tmp_path / "mid.dcm", np.full((8, 8), -600, np.int16)), image_size=8, channels=1)
    assert abs(int(mid.mean()) - 128) <= 1  # the window's centre is mid-grey
    wide = decode_image(path, image_size=8, channels=1, ct_window="0,5000")[..., 0]
    assert 0 < wide.min() and wide.max() < 255  # the same slice in a wider window clips nothing
    for bad in ("bone", "40", "40,-1"):
        with pytest.raises(UserError, match="--ct-window must be one of lung, mediastinum, file"):
            decode_image(path, image_size=8, channels=1, ct_window=bad)


def test_monochrome1_is_inverted_and_an_xray_uses_its_own_window(tmp_path):
    ramp = np.linspace(0, 4095, 64).reshape(8, 8).astype(np.uint16)
    plain = decode_image(_dicom(tmp_path / "m2.dcm", ramp, bits=12), image_size=8, channels=1)
    inverted = decode_image(_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1", bits=12), image_size=8,
                            channels=1)
    assert np.array_equal(plain.astype(int) + inverted, np.full(plain.shape, 255))
    assert plain[0, 0, 0] == 0 and plain[-1, -1, 0] == 255  # no window: scaled by the image's own maximum
    windowed = decode_image(_dicom(tmp_path / "w.dcm", ramp, bits=12, window=(1000, 500)), image_size=8, channels=1)
    below, above = ramp <= 750, ramp >= 1250
    assert (windowed[..., 0][below] == 0).all() and (windowed[..., 0][above] == 255).all()


def test_compressed_files_decode_and_a_missing_decoder_is_named(tmp_path):
    ramp = np.linspace(0, 4095, 64).reshape(8, 8).astype(np.uint16)
    plain = decode_image(_dicom(tmp_path / "plain.dcm", ramp, bits=12), image_size=8, channels=1)
    rle = decode_image(_dicom(tmp_path / "rle.dcm", ramp, bits=12, syntax=RLELossless), image_size=8, channels=1)
    assert np.array_equal(plain, rle)
    jpeg_ls = tmp_path / "jls.dcm"
    _dicom(jpeg_ls, ramp, bits=12)
    ds = pydicom.dcmread(jpeg_ls)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"  # JPEG-LS lossless; bytes that no decoder reads
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8not really jpeg-ls\xff\xd9"])
    ds.save_as(jpeg_ls)
    with pytest.raises(UserError, match=r"pixel data cannot be decoded \(transfer syntax JPEG-LS Lossless"):
        decode_image(jpeg_ls, image_size=8, channels=1)


def test_multiframe_and_imageless_dicom_and_stray_files_are_named_or_counted(tmp_path):
    pixels = np.zeros((8, 8), np.uint16)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for k in range(5):
            _dicom(tmp_path / name / f"{k}.dcm", pixels + k * 100)
    _dicom(tmp_path / "a" / "report.dcm", None, modality="SR")  # a structured report: no image
    _dicom(tmp_path / "a" / "IM0001", pixels + 7)  # no extension, DICOM preamble: an image
    (tmp_path / "a" / "notes.txt").write_text("read me")
    (tmp_path / "b" / "README").write_text("no extension, not DICOM")
    (tmp_path / "b" / ".DS_Store").write_bytes(b"\0")
    for k in range(5, 10):
        _dicom(tmp_path / "a" / f"{k}.dcm", pixels + k)
        _dicom(tmp_path / "b" / f"{k}.dcm", pixels + k)
    data = load_dataset(tmp_path, image_size=8)
    assert len(data.labels) == 21 and any(p.endswith("IM0001") for p in data.paths)
    assert data.unread == {"DICOM objects without pixel data (SR)": 1, ".txt files": 1,
                           "files with no extension (not DICOM)": 1, "hidden files": 1}
    from ingest.leakage import audit_dataset, render
    report = render(audit_dataset(data))
    assert "4 file(s) under the data were not read as images" in report and "1 .txt files" in report
    _dicom(tmp_path / "b" / "cine.dcm", pixels, frames=3)
    with pytest.raises(UserError, match=r"cine.dcm \(it holds 3 frames \(a multi-frame DICOM\); export one image per file\)"):
        load_dataset(tmp_path, image_size=8)


def test_patient_id_groups_the_images_and_a_blank_one_is_warned_about(tmp_path):
    for name in ("covid", "normal"):
        (tmp_path / name).mkdir()
        for k in range(40):
            _ct(tmp_path / name / f"{k}.dcm", np.full((8, 8), k * 10 - 800, np.int16),
                patient=f"{name}-{k // 4}" if k < 36 else "")
    with pytest.warns(UserWarning, match="8 of 80 images have no DICOM PatientID"):
        data = load_dataset(tmp_path, image_size=8, seed=0)
    assert "groups: DICOM PatientID" in data.source
    splits = {}
    for group, split in zip(data.groups, data.split):
        splits.setdefault(group, set()).add(int(split))
    assert all(len(s) == 1 for s in splits.values())  # no patient in two splits
    assert len(set(data.groups)) == 2 * 9 + 8


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, pneumonia_npz):
    """Real PneumoniaMNIST X-rays as DICOM in three encodings (CT slices with rescale and lung
    window, MONOCHROME1 and MONOCHROME2 16-bit X-rays with a window) plus PNGs, in class folders."""
    arrays = np.load(pneumonia_npz)
    root = tmp_path_factory.mktemp("mixed")
    for label, name in enumerate(["normal", "pneumonia"]):
        (root / name).mkdir()
        idx = np.flatnonzero(arrays["train_labels"].ravel() == label)[:60]
        for k, i in enumerate(idx):
            x = arrays["train_images"][i].astype(np.int32)
            kind = k % 4
            # two scanner makers and both sexes, as the headers of a multi-site export say
            header = dict(Manufacturer=("Acme Medical", "Globex")[k // 4 % 2], PatientSex="MF"[k % 2], PatientAge="061Y")
            if kind == 0:
                _ct(root / name / f"ct{k}.dcm", (x * 1500 / 255 - 1350).astype(np.int16), **header)
            elif kind == 1:
                _dicom(root / name / f"m1_{k}.dcm", ((255 - x) * 16).astype(np.uint16), photometric="MONOCHROME1",
                       bits=12, window=(2040, 4080), **header)
            elif kind == 2:
                _dicom(root / name / f"m2_{k}", (x * 257).astype(np.uint16), bits=16, **header)  # no extension
            else:
                Image.fromarray(x.astype(np.uint8)).save(root / name / f"png{k}.png")
    return root


def test_a_folder_mixing_dicom_and_png_searches_finalizes_and_predicts_the_same_pixels(mixed_folder, tmp_path,
                                                                                        monkeypatch):
    from search.final import strata
    from search.run import run_search
    from search.options import SearchOptions
    from search.final.saved_model import load_model
    from ingest.decoding import decode_images
    monkeypatch.setattr(strata, "MIN_IMAGES", 3)  # this test split holds 12 images: strata of 3 shown
    folder = run_search(SearchOptions(space="tiny", data=str(mixed_folder), storage=str(tmp_path), name="dicom", stop_rule=False,
                                      num_samples=2, max_epochs=2, grace_period=1, image_size=28, folds=1, top_k=1,
                                      warm_restart="none", cpus_per_trial=1, seed=0))
    data = load_dataset(mixed_folder, image_size=28, cache=str(tmp_path / "data-cache"))
    assert data.store["reused"] and len(data.labels) == 120  # every file, DICOM and PNG, used
    formats = pd.Series([i["format"] for i in data.file_infos]).value_counts().to_dict()
    assert formats == {"DICOM": 90, "PNG": 30}
    # the three DICOM encodings of one X-ray decode to (nearly) the pixels of its PNG
    by_path = dict(zip(data.paths, range(len(data.paths))))
    png, ct = data.images[by_path["normal/png3.png"]], data.images[by_path["normal/ct0.dcm"]]
    assert png.shape == ct.shape == (28, 28, 1)
    report = (folder / "data_report.md").read_text()  # the audit shows what the trials see, beside the report
    assert "`data_preview.png`" in report and (folder / "data_preview.png").stat().st_size > 5000
    final = folder / "final"
    # the test figures by what the DICOM headers record: a table per manufacturer, sex and age band
    metrics = json.loads((final / "metrics.json").read_text())
    tested = data.strata["manufacturer"][data.indices("test")]
    makers = {m for m in ("Acme Medical", "Globex") if (tested == m).sum() >= 3}  # the test split's strata of 3+
    assert makers and set(metrics["strata"]["manufacturer"]) == makers and "age band" in metrics["strata"]
    for maker, figures in metrics["strata"]["manufacturer"].items():
        assert figures["images"] == int((tested == maker).sum())  # the PNGs ("" : unrecorded) are in no stratum
    final_report = (final / "report.md").read_text()
    assert "## Test figures by stratum" in final_report and "**manufacturer**" in final_report
    assert all(f"| {m} |" in final_report for m in makers) and "| 60-69 |" in final_report
    record = load_model(final / "ensemble").record
    assert record["preprocessing"]["ct_window"] == "lung"
    out = tmp_path / "predictions.csv"
    run = subprocess.run([sys.executable, "-m", "search.predict", "--model", str(final / "ensemble"), "--images",
                          str(mixed_folder), "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    table = pd.read_csv(out)
    assert len(table) == 120
    files = [mixed_folder / p for p in data.paths]
    pixels, kept, _ = decode_images(files, image_size=28, channels=1)
    assert kept == files and np.array_equal(pixels, data.images)  # predict decodes exactly as the search did
    test = pd.read_csv(final / "test_predictions.csv")
    joined = test.merge(table, on="path", suffixes=("_final", "_predict"))
    assert len(joined) == len(test)
    assert np.allclose(joined["p_pneumonia_final"], joined["p_pneumonia_predict"], atol=1e-5)


def _with(path, **attributes):
    ds = pydicom.dcmread(path)
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.save_as(path)
    return path


def test_the_voi_stage_follows_the_standard_formulas(tmp_path):
    """Each VOI rule against the formula of PS3.3 C.11.2 written out here, to within one grey level:
    a SIGMOID window, a LINEAR_EXACT one, and a VOI LUT that declares 16 bits but spans 0..4095
    (scaled by its range, not by the declared depth)."""
    ramp = np.linspace(0, 4095, 64).reshape(8, 8).astype(np.uint16)
    x = ramp.astype(np.float64)
    sigmoid = decode_image(_with(_dicom(tmp_path / "s.dcm", ramp, bits=12, window=(2000, 1000)),
                                 VOILUTFunction="SIGMOID"), image_size=8, channels=1)[..., 0]
    assert np.abs(sigmoid - 255 / (1 + np.exp(-4 * (x - 2000) / 1000))).max() <= 1
    exact = decode_image(_with(_dicom(tmp_path / "e.dcm", ramp, bits=12, window=(2000, 1000)),
                               VOILUTFunction="LINEAR_EXACT"), image_size=8, channels=1)[..., 0]
    assert np.abs(exact - np.clip((x - 1500) / 1000, 0, 1) * 255).max() <= 1
    lut = pydicom.Dataset()
    lut.LUTDescriptor, lut.LUTData = [4096, 0, 16], list(range(4095, -1, -1))  # inverting, 12-bit values
    lut["LUTData"].VR = "US"
    path = _dicom(tmp_path / "lut.dcm", ramp, bits=12)
    ds = pydicom.dcmread(path)
    ds.VOILUTSequence = pydicom.Sequence([lut])
    ds.save_as(path)
    by_lut = decode_image(path, image_size=8, channels=1)[..., 0]
    assert np.abs(by_lut - (4095 - x) * 255 / 4095).max() <= 1  # the full 0..255, not 0..16


def test_padding_is_black_and_out_of_the_range_and_palette_colour_is_read_in_colour(tmp_path):
    image = np.full((8, 8), 4095, np.uint16)  # a ring of padding at the top of the 12-bit range
    image[2:6, 2:6] = np.arange(16).reshape(4, 4) * 100 + 500  # the body: 500..2000
    path = _dicom(tmp_path / "pad.dcm", image, bits=12)
    ds = pydicom.dcmread(path)
    ds.add_new(0x00280120, "US", 4095)  # Pixel Padding Value
    ds.save_as(path)
    padded = decode_image(path, image_size=8, channels=1)[..., 0]
    assert (padded[image == 4095] == 0).all()
    assert padded[2:6, 2:6].max() == 255  # stretched over the body alone (4095 in the range: 2000 -> 124)
    index = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    path = _dicom(tmp_path / "palette.dcm", index, bits=8)
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "PALETTE COLOR", 1
    for k, table in enumerate((np.arange(256), 255 - np.arange(256), np.zeros(256, int))):  # red, green, blue
        ds.add_new(0x00281101 + k, "US", [256, 0, 16])  # the table's descriptor: entries, first value, bits
        ds.add_new(0x00281201 + k, "OW", (table * 257).astype("<u2").tobytes())
    ds.save_as(path)
    rgb = decode_image(path, image_size=8, channels=3)
    assert np.array_equal(rgb[..., 0], index) and np.array_equal(rgb[..., 1], 255 - index) and not rgb[..., 2].any()


def test_a_file_cut_before_its_pixels_is_an_error_and_scouts_are_noted(tmp_path, capsys):
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 50
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for k in range(6):
            _dicom(tmp_path / name / f"{k}.dcm", pixels + k)
    _with(tmp_path / "a" / "0.dcm", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    _with(tmp_path / "b" / "1.dcm", SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
    data = load_dataset(tmp_path, image_size=8)
    assert len(data.labels) == 12
    assert "note: 1 localizer image(s), 1 secondary capture image(s) under" in capsys.readouterr().out
    whole = (tmp_path / "b" / "2.dcm").read_bytes()
    (tmp_path / "b" / "2.dcm").write_bytes(whole[:whole.rindex(b"\xe0\x7f\x10\x00")])  # cut at the Pixel Data tag
    with pytest.raises(UserError, match=r"2.dcm \(cut short or damaged: the file ends before its pixel data"):
        load_dataset(tmp_path, image_size=8)


@pytest.mark.parametrize("where", ["in its header", "in its pixel data"])
def test_a_dicom_cut_inside_its_header_or_its_pixels_is_named_damaged(tmp_path, where):
    """Not "an object without pixel data" (the words for a structured report), whatever part is missing."""
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 50
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for k in range(10):
            _dicom(tmp_path / name / f"{k}.dcm", pixels + k, patient=f"patient {name}{k}")
    path = tmp_path / "b" / "2.dcm"
    whole = path.read_bytes()
    cut = whole.index(b"\x10\x00\x20\x00") + 6 if where == "in its header" else len(whole) - 40  # inside PatientID
    path.write_bytes(whole[:cut])
    with pytest.raises(UserError, match=r"2.dcm \(cut short or damaged: ") as raised:
        load_dataset(tmp_path, image_size=8)
    assert "without pixel data" not in str(raised.value)
    data = load_dataset(tmp_path, image_size=8, skip_corrupt=True)  # left out when asked, and counted as unreadable
    assert len(data.labels) == 19 and not data.unread

"""Writers of small test inputs for the pipeline.io tests: DICOM in each transfer syntax,
an SVS-like TIFF, a sparse giant tiled TIFF, OME-Zarr. Nothing here is used by the library."""

from __future__ import annotations

from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import tifffile
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

PATIENT = {
    "PatientName": "Doe^Jane",
    "PatientID": "SECRET-4711",
    "PatientBirthDate": "19700101",
    "AccessionNumber": "ACC-0815",
}


def xray_pixels(height: int = 48, width: int = 40, bits: int = 12) -> np.ndarray:
    """A smooth gradient plus a bright block: compresses well and catches transposes."""
    yy, xx = np.mgrid[0:height, 0:width]
    top = (1 << bits) - 1
    pixels = (yy * 7 + xx * 3) % (top + 1)
    pixels[height // 4 : height // 2, width // 5 : width // 2] = top
    return pixels.astype(np.uint8 if bits <= 8 else np.uint16)


def dicom_dataset(
    pixels: np.ndarray,
    bits_stored: int,
    photometric: str = "MONOCHROME2",
    **attributes: object,
) -> Dataset:
    """A minimal single-frame DX dataset in explicit VR little endian, with patient data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid.generate_uid()
    ds.SeriesInstanceUID = uid.generate_uid()
    ds.FrameOfReferenceUID = uid.generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "segpipe-tests"
    ds.Modality = "DX"
    ds.PatientSex = "F"
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


def write_dicom(path: Path, ds: Dataset, syntax: str = uid.ExplicitVRLittleEndian) -> Path:
    """Save ``ds`` with its pixels encoded in ``syntax``: pydicom's encoders where pydicom
    has one (RLE, JPEG-LS, JPEG 2000), imagecodecs' libjpeg-turbo for JPEG baseline and
    lossless (pydicom 3 has no JPEG encoder)."""
    pixels = ds.pixel_array
    if syntax in (uid.RLELossless, uid.JPEGLSLossless, uid.JPEG2000Lossless):
        ds.compress(syntax)
    elif syntax == uid.JPEGBaseline8Bit:
        ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(pixels, level=95)])
        ds.file_meta.TransferSyntaxUID = syntax
        ds.LossyImageCompression = "01"
    elif syntax == uid.JPEGLosslessSV1:
        frame = imagecodecs.jpeg8_encode(
            pixels, lossless=True, predictor=1, bitspersample=int(ds.BitsStored)
        )
        ds.PixelData = encapsulate([frame])
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax != uid.ExplicitVRLittleEndian:
        raise ValueError(f"no encoder for {syntax}")
    ds["PixelData"].is_undefined_length = ds.file_meta.TransferSyntaxUID.is_compressed
    ds.save_as(path, enforce_file_format=True)
    return path


def write_svs_like(path: Path, level0: np.ndarray, mpp: float = 0.499) -> Path:
    """An Aperio-style TIFF: tiled JPEG level 0, a stripped thumbnail, a tiled half-size
    level, then label and macro pages, with Aperio ImageDescriptions."""
    height, width, _ = level0.shape
    head = (
        f"Aperio Image Library v12.0.15 \n{width}x{height} [0,0 {width}x{height}] "
        "(256x256) JPEG/RGB Q=90"
    )
    half = level0[::2, ::2]
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            level0,
            tile=(256, 256),
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            description=f"{head}|AppMag = 20|MPP = {mpp}",
        )
        tif.write(
            level0[::8, ::8],
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            description=f"{head} -> thumbnail",
        )
        tif.write(
            half,
            tile=(256, 256),
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            description=f"{head} -> {half.shape[1]}x{half.shape[0]} - |AppMag = 20|MPP = {mpp}",
        )
        tif.write(
            level0[:64, :64],
            compression="lzw",
            photometric="rgb",
            metadata=None,
            subfiletype=1,
            description="Aperio Image Library v12.0.15\nlabel 64x64",
        )
        tif.write(
            level0[:64, :96],
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            subfiletype=9,
            description="Aperio Image Library v12.0.15\nmacro 96x64",
        )
    return path


def write_sparse_giant_tiff(path: Path, size: int = 50_000, tile: int = 512) -> Path:
    """A size x size uint8 tiled TIFF whose tile (i, j) holds the constant (i*n + j) % 251,
    written from a few pre-compressed tiles (a few MB on disk, seconds to write)."""
    encoded = [imagecodecs.zlib_encode(np.full((tile, tile), v, np.uint8)) for v in range(251)]
    per_row = -(-size // tile)
    tiles = (encoded[index % 251] for index in range(per_row * per_row))
    tifffile.imwrite(
        path,
        tiles,
        shape=(size, size),
        dtype=np.uint8,
        tile=(tile, tile),
        compression="zlib",
        bigtiff=True,
    )
    return path


def giant_tile_value(y: int, x: int, size: int = 50_000, tile: int = 512) -> int:
    per_row = -(-size // tile)
    return ((y // tile) * per_row + x // tile) % 251


def read_pixels(path: Path) -> np.ndarray:
    """The stored pixel values of a DICOM file, as pydicom decodes them."""
    return pydicom.dcmread(path).pixel_array


class ReadRecorder:
    """An array-like over `data` that records the size of every slice read from it: what
    a writer that must read tile by tile is checked with."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.reads = data, data.shape, []

    def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
        block = self.data[index]
        self.reads.append(block.size)
        return block

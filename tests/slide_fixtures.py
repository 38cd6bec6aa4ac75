"""Writers of small whole-slide test inputs: DICOM WSI series (pydicom, by hand: neither
wsidicom nor highdicom writes one from pixels), and vendor-flavoured TIFFs (tifffile).
Nothing here is used by the library."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
import PIL.Image
import tifffile
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from tests.io_fixtures import PATIENT

Keep = Callable[[int, int], bool]  # (tile row, tile column) -> whether the frame is stored


def tissue_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Pink textured 'tissue' in an ellipse on white glass: tissue detection finds it, and
    the texture catches transposed or shifted tiles."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((yy - height / 2) / (height * 0.35)) ** 2 + ((xx - width / 2) / (width * 0.3)) ** 2 <= 1
    pixels = np.full((height, width, 3), 240, np.uint8)
    texture = np.stack([190 + (yy * 7 + xx * 3) % 50, 70 + (xx * 5) % 60, 150 + (yy * 3) % 60], axis=2)
    noise = rng.integers(0, 12, (height, width, 1))
    pixels[inside] = (texture + noise)[inside].astype(np.uint8)
    return pixels


def write_dicom_wsi(
    folder: Path,
    level0: np.ndarray,
    tile: int = 64,
    mpp: float | None = 0.25,
    levels: int = 3,
    sparse: bool = False,
    keep: Keep | None = None,
    compression: str = "none",
) -> list[Path]:
    """A DICOM WSI series in `folder`: one VL Whole Slide Microscopy instance per level
    (level i = level0[::2^i, ::2^i]), TILED_FULL or TILED_SPARSE; `keep` leaves frames of
    level 0 out (sparse only: absent frames are background); `mpp` None writes no Pixel
    Measures; `compression` 'none' (explicit VR little endian, RGB) or 'jpeg' (baseline,
    YBR_FULL_422). Carries patient identifiers, as a scanner's series does."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = uid.generate_uid(), uid.generate_uid(), uid.generate_uid()
    paths = []
    for index in range(levels):
        step = 2**index
        ds = _wsi_level(level0[::step, ::step], tile, None if mpp is None else mpp * step,
                        sparse, keep if index == 0 else None, compression)  # fmt: skip
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame_of_reference
        ds.InstanceNumber = index + 1
        path = folder / f"level{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _wsi_level(pixels: np.ndarray, tile: int, mpp: float | None, sparse: bool, keep: Keep | None,
               compression: str) -> Dataset:  # fmt: skip
    height, width, channels = pixels.shape
    rows, cols = -(-height // tile), -(-width // tile)
    positions = [(r, c) for r in range(rows) for c in range(cols) if keep is None or keep(r, c)]
    frames = []
    for r, c in positions:
        frame = np.zeros((tile, tile, channels), np.uint8)  # edge frames padded, as scanners do
        part = pixels[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
        frame[: part.shape[0], : part.shape[1]] = part
        frames.append(frame)
    ds = _wsi_header(compression)
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = height, width
    ds.NumberOfFrames = len(frames)
    ds.DimensionOrganizationType = "TILED_SPARSE" if sparse else "TILED_FULL"
    shared = Dataset()
    if mpp is not None:
        measures = Dataset()
        measures.PixelSpacing = [mpp / 1000, mpp / 1000]  # mm, row \ column
        measures.SliceThickness = 0.001
        shared.PixelMeasuresSequence = [measures]
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * mpp / 1000, height * mpp / 1000
        ds.ImagedVolumeDepth = 0.001
    ds.SharedFunctionalGroupsSequence = [shared]
    if sparse:
        ds.PerFrameFunctionalGroupsSequence = [_frame_position(r, c, tile) for r, c in positions]
    if compression == "jpeg":
        encoded = [imagecodecs.jpeg8_encode(f, level=95, outcolorspace="YCBCR") for f in frames]
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = b"".join(f.tobytes() for f in frames)
    return ds


def _wsi_header(compression: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.VLWholeSlideMicroscopyImageStorage
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.JPEGBaseline8Bit if compression == "jpeg" else uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "SM"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.PatientSex, ds.ReferringPhysicianName, ds.StudyID = "F", "", "1"  # type 2, as scanners write them
    ds.StudyDate, ds.StudyTime = "20240102", "120000"
    ds.ContainerIdentifier = "SLIDE-4711"
    ds.IssuerOfTheContainerIdentifierSequence, ds.ContainerTypeCodeSequence = [], []  # type 2
    specimen = Dataset()
    specimen.SpecimenIdentifier, specimen.SpecimenUID = "S-1", uid.generate_uid()
    specimen.IssuerOfTheSpecimenIdentifierSequence, specimen.SpecimenPreparationSequence = [], []
    ds.SpecimenDescriptionSequence = [specimen]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422" if compression == "jpeg" else "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.TotalPixelMatrixFocalPlanes = 1
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence = [path]
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
    ds.TotalPixelMatrixOriginSequence = [origin]
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]  # type 1: rows along -Y, columns along -X
    if compression == "jpeg":
        ds.LossyImageCompression = "01"
    return ds


def _frame_position(row: int, col: int, tile: int) -> Dataset:
    position = Dataset()
    position.RowPositionInTotalImagePixelMatrix = row * tile + 1  # 1-based
    position.ColumnPositionInTotalImagePixelMatrix = col * tile + 1
    position.XOffsetInSlideCoordinateSystem, position.YOffsetInSlideCoordinateSystem = 20.0, 40.0
    position.ZOffsetInSlideCoordinateSystem = 0.0
    item = Dataset()
    item.PlanePositionSlideSequence = [position]
    return item


def write_aperio(path: Path, level0: np.ndarray, mpp: float = 0.25, compression: str = "jpeg",
                 tile: int = 256, levels: int = 2) -> Path:  # fmt: skip
    """An Aperio SVS (OpenSlide's 'aperio' driver and tifffile both read it): tiled level 0,
    a stripped thumbnail (always the second page of an SVS), then half-size levels, with
    Aperio ImageDescriptions. `compression` 'jpeg', 'none' (exact pixels for two-reader
    comparisons) or 'jpeg2000' (Aperio's 33005, RGB)."""
    height, width, _ = level0.shape
    codec = {"jpeg": "jpeg", "none": None, "jpeg2000": 33005}[compression]
    head = f"Aperio Image Library v12.0.15 \n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    tail = f"|AppMag = 40|MPP = {mpp}"
    options = {"photometric": "rgb", "metadata": None}
    with tifffile.TiffWriter(path, bigtiff=level0.size > 1 << 30) as tif:
        tif.write(level0, tile=(tile, tile), compression=codec, description=head + tail, **options)
        tif.write(level0[::16, ::16], compression="jpeg", description=f"{head} -> thumbnail", **options)
        for index in range(1, levels):
            level = level0[:: 2**index, :: 2**index]
            tif.write(level, tile=(tile, tile), compression=codec,
                      description=f"{head} -> {level.shape[1]}x{level.shape[0]} - {tail}", **options)  # fmt: skip
    return path


def write_ndpi_like(path: Path, level0: np.ndarray, mpp: float = 0.25, levels: int = 3,
                    blocks: int = 12) -> Path:  # fmt: skip
    """A Hamamatsu NDPI as tifffile and OpenSlide's 'hamamatsu' driver read one: NDPI tags
    (65420 format flag, 65421 magnification, offsets, focal plane), Make 'Hamamatsu', each
    level one JPEG strip with restart markers every `blocks` MCUs and their offsets in the
    McuStarts tag (65426), resolution in pixels per cm. Readers decode it restart interval
    by restart interval (8 rows x 8·blocks columns). Name it .tif: tifffile reads a '.ndpi' name with
    NDPI's 64-bit offset layout, which it cannot write. `level0` is cropped so every level's
    MCU rows hold whole restart intervals (OpenSlide requires it)."""
    step = 8 * blocks * 2 ** (levels - 1)  # `blocks` MCUs of 8 px (4:4:4) at the smallest level
    level0 = level0[: level0.shape[0] // (8 * 2 ** (levels - 1)) * (8 * 2 ** (levels - 1)),
                    : level0.shape[1] // step * step]  # fmt: skip
    pixels_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path) as tif:
        for index in range(levels):
            level = np.ascontiguousarray(level0[:: 2**index, :: 2**index])
            jpeg, starts = _restart_jpeg(level, blocks=blocks)
            tags = [(65420, "I", 1, 1, True), (65421, "f", 1, 40.0 / 2**index, True),
                    (65422, "i", 1, 0, True), (65423, "i", 1, 0, True), (65424, "i", 1, 0, True),
                    (65426, "I", len(starts), starts, True), (271, "s", 0, "Hamamatsu", True)]  # fmt: skip
            tif.write(iter([jpeg]), shape=level.shape, dtype=np.uint8, compression="jpeg", photometric="ycbcr",
                      subsampling=(1, 1), rowsperstrip=level.shape[0], metadata=None, extratags=tags,
                      resolution=(pixels_per_cm / 2**index,) * 2, resolutionunit="CENTIMETER")  # fmt: skip
    return path


def _restart_jpeg(pixels: np.ndarray, blocks: int) -> tuple[bytes, list[int]]:
    """One baseline JPEG (4:4:4) with a restart marker every `blocks` MCUs, and the offset
    of each restart interval's entropy-coded data (the first: the end of the header)."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, subsampling=0,
                                     restart_marker_blocks=blocks)  # fmt: skip
    jpeg = buffer.getvalue()
    scan = jpeg.index(b"\xff\xda")
    starts = [scan + 2 + int.from_bytes(jpeg[scan + 2 : scan + 4], "big")]
    at = starts[0]
    while (at := jpeg.find(b"\xff", at)) >= 0 and jpeg[at + 1] != 0xD9:
        if 0xD0 <= jpeg[at + 1] <= 0xD7:  # RSTn: the next interval starts after it
            starts.append(at + 2)
        at += 2
    return jpeg, starts


def write_philips_like(path: Path, level0: np.ndarray, mpp: float = 0.25, levels: int = 3,
                       tile: int = 256) -> Path:  # fmt: skip
    """A Philips TIFF as OpenSlide's 'philips' driver and tifffile read one: Software
    'Philips DP', the DPUfsImport XML (one WSI image, a DICOM_PIXEL_SPACING per level) on
    the first page, reduced-resolution tiled pages after it. As Philips' writer does, every
    level is padded to whole tiles (the XML's spacings give the true sizes)."""
    spacings = "".join(
        '<DataObject ObjectType="PixelDataRepresentation">'
        f'<Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" Element="0x0030" PMSVR="IDoubleArray">'
        f'&quot;{mpp * 2**i / 1000:.9g}&quot; &quot;{mpp * 2**i / 1000:.9g}&quot;</Attribute>'
        f'<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_NUMBER" Group="0x101D" Element="0x100B" '
        f'PMSVR="IUInt16">{i}</Attribute></DataObject>'
        for i in range(levels)
    )
    xml = (
        '<?xml version="1.0" encoding="UTF-8" ?><DataObject ObjectType="DPUfsImport">'
        '<Attribute Name="DICOM_MANUFACTURER" Group="0x0008" Element="0x0070" PMSVR="IString">PHILIPS</Attribute>'
        '<Attribute Name="PIM_DP_SCANNED_IMAGES" Group="0x301D" Element="0x1003" PMSVR="IDataObjectArray"><Array>'
        '<DataObject ObjectType="DPScannedImage">'
        '<Attribute Name="PIM_DP_IMAGE_TYPE" Group="0x301D" Element="0x1004" PMSVR="IString">WSI</Attribute>'
        '<Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" Element="0x0030" PMSVR="IDoubleArray">'
        f'&quot;{mpp / 1000:.9g}&quot; &quot;{mpp / 1000:.9g}&quot;</Attribute>'
        '<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" Group="0x1001" Element="0x8B01" '
        f'PMSVR="IDataObjectArray"><Array>{spacings}</Array></Attribute>'
        "</DataObject></Array></Attribute></DataObject>"
    )
    with tifffile.TiffWriter(path) as tif:
        for index in range(levels):
            level = level0[:: 2**index, :: 2**index]
            padded = np.zeros((-(-level.shape[0] // tile) * tile, -(-level.shape[1] // tile) * tile, 3), np.uint8)
            padded[: level.shape[0], : level.shape[1]] = level
            tif.write(padded, tile=(tile, tile), compression="zlib", photometric="rgb", metadata=None,
                      software="Philips DP v1.0", subfiletype=1 if index else 0,
                      description=xml if index == 0 else None)  # fmt: skip
    return path


def write_leica_scn(path: Path, level0: np.ndarray, mpp: float = 0.5, margin: int = 96) -> Path:
    """A Leica SCN (BigTIFF with the SCN XML on its first page) as OpenSlide's 'leica'
    driver reads it: one brightfield main image of two levels, placed `margin` pixels
    inside a larger collection (the glass: nothing scanned, transparent to OpenSlide).
    Sizes and offsets are in nm ('clicks'); the resolution tags give mpp."""
    height, width, _ = level0.shape
    nm = mpp * 1000
    dimensions = "".join(f'<dimension sizeX="{width >> r}" sizeY="{height >> r}" r="{r}" ifd="{r}"/>' for r in (0, 1))
    xml = (
        '<?xml version="1.0"?><scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">'
        f'<collection name="test" sizeX="{(width + 2 * margin) * nm:.0f}" sizeY="{(height + 2 * margin) * nm:.0f}">'
        '<barcode>SLIDE-4711</barcode><image name="main"><creationDate>2024-01-01T12:00:00.00Z</creationDate>'
        '<device model="Leica SCN400;Leica SCN" version="1.5"/>'
        f'<pixels sizeX="{width}" sizeY="{height}">{dimensions}</pixels>'
        f'<view sizeX="{width * nm:.0f}" sizeY="{height * nm:.0f}" offsetX="{margin * nm:.0f}" '
        f'offsetY="{margin * nm:.0f}" spacingZ="0"/>'
        "<scanSettings><objectiveSettings><objective>20</objective></objectiveSettings>"
        "<illuminationSettings><numericalAperture>0.4</numericalAperture>"
        "<illuminationSource>brightfield</illuminationSource></illuminationSettings></scanSettings>"
        "</image></collection></scn>"
    )
    ppcm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for r in (0, 1):
            tif.write(level0[:: 2**r, :: 2**r], tile=(128, 128), compression="zlib", photometric="rgb",
                      metadata=None, description=xml if r == 0 else None,
                      resolution=(ppcm / 2**r, ppcm / 2**r), resolutionunit="CENTIMETER")  # fmt: skip
    return path

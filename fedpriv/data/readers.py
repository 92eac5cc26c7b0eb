"""Read one image file — PNG/JPEG/TIFF, DICOM, NIfTI or .npy — into a [0, 1] float array.

2D files become (1, size, size) and volumes (1, size, size, size). Intensities are mapped to
[0, 1] by a window (center, width) in the file's own units (Hounsfield units for CT), by the
DICOM VOI window when the file has one, or else by the 0.5–99.5 percentile range of the image.
Any failure to decode a file is reported as a FedprivError naming that file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import zoom

from fedpriv.errors import FedprivError

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy")
READABLE_SUFFIXES = PIL_SUFFIXES + DICOM_SUFFIXES + VOLUME_SUFFIXES


@dataclass(frozen=True)
class ReadOptions:
    """How files become model inputs: edge length, intensity window, volume fitting."""

    image_size: int
    window: tuple[float, float] | None = None  # (center, width); None = from the file
    volume_fit: str = "resample"  # resample (interpolate to the cube) | crop (centre crop/pad)


@dataclass(frozen=True)
class ReadImage:
    """One decoded file: pixels in [0, 1] (channel first) and metadata the file carries."""

    pixels: np.ndarray
    metadata: dict[str, str | float]


def is_readable(path: Path) -> bool:
    return path.name.lower().endswith(READABLE_SUFFIXES) or _is_unsuffixed_dicom(path)


def _is_unsuffixed_dicom(path: Path) -> bool:
    """A DICOM file named without .dcm (as scanners and PACS exports often write them): no
    known suffix, and the DICM preamble."""
    from pydicom.misc import is_dicom

    return not path.name.lower().endswith(READABLE_SUFFIXES) and path.is_file() and is_dicom(path)


def read_file(path: Path, options: ReadOptions) -> ReadImage:
    """Decode, window and resize one file; raise FedprivError naming the file if it cannot."""
    name = path.name.lower()
    if not path.is_file():
        raise FedprivError(f"{path} does not exist; fix the path or the data.root it is relative to")
    try:
        if name.endswith(DICOM_SUFFIXES) or _is_unsuffixed_dicom(path):
            raw, window, metadata = _decode_dicom(path)
        elif name.endswith((".nii", ".nii.gz")):
            raw, window, metadata = _decode_nifti(path), None, {}
        elif name.endswith(".npy"):
            raw, window, metadata = np.load(path, allow_pickle=False), None, {}
        elif name.endswith(PIL_SUFFIXES):
            (raw, window), metadata = _decode_pil(path), {}
        else:
            raise FedprivError(f"{path}: unknown file type; readable: {', '.join(READABLE_SUFFIXES)} and DICOM files without a suffix")
        raw = np.squeeze(np.asarray(raw, dtype=np.float32))
    except FedprivError:
        raise
    except Exception as error:  # any decoding failure is this file's problem, whatever raised it
        raise FedprivError(f"{path} cannot be read ({type(error).__name__}: {error}); replace or remove the file") from None
    if raw.ndim not in (2, 3) or min(raw.shape) < 2:
        raise FedprivError(f"{path} holds an array of shape {raw.shape}; expected a 2D image or a 3D volume")
    if not np.isfinite(raw).all():
        raise FedprivError(f"{path} contains NaN or infinite values; fix or remove the file")
    fitted = fit_to_shape(to_unit_range(raw, options.window or window), options)
    return ReadImage(pixels=fitted[None], metadata=metadata)


def fit_to_shape(image: np.ndarray, options: ReadOptions) -> np.ndarray:
    """A [0, 1] 2D image → size×size; a volume → size³ (see ReadOptions.volume_fit)."""
    fitted = _resize_2d(image, options.image_size) if image.ndim == 2 else _fit_volume(image, options)
    return fitted.astype(np.float32)


def to_unit_range(raw: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Clip to the window (center, width) and map it to [0, 1]; no window: robust min–max."""
    if window is not None:
        center, width = window
        low, high = center - width / 2, center + width / 2
    else:
        low, high = np.percentile(raw, [0.5, 99.5])
    if high <= low:  # a constant image: all zeros rather than a division by zero
        return np.zeros_like(raw)
    return np.clip((raw - low) / (high - low), 0.0, 1.0)


def _decode_pil(path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """8-bit images keep their absolute scale (0–255 → [0, 1]); 16-bit and float images are
    windowed like any other file."""
    with Image.open(path) as image:
        image.load()
        if image.mode not in ("L", "1", "I", "I;16", "I;16B", "I;16L", "F"):
            image = image.convert("L")
        pixels = np.asarray(image)
    return pixels, (127.5, 255.0) if pixels.dtype in (np.uint8, np.bool_) else None


def _decode_dicom(path: Path) -> tuple[np.ndarray, tuple[float, float] | None, dict]:
    """Stored values → modality values (RescaleSlope/Intercept); the file's VOI window when
    present; MONOCHROME1 inverted so that dense tissue is bright, as in MONOCHROME2."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    pixels = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    window = None
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = ds.WindowCenter, ds.WindowWidth
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        window = (center, width) if width > 0 else None
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        pixels = pixels.max() + pixels.min() - pixels
    return pixels, window, _dicom_metadata(ds)


def _dicom_metadata(ds) -> dict[str, str | float]:
    """Tags a fairness study may use, under fedpriv's metadata names, when the file has them."""
    metadata: dict[str, str | float] = {}
    for tag, name in (("PatientSex", "sex"), ("Manufacturer", "scanner"), ("InstitutionName", "site")):
        value = str(ds.get(tag, "") or "").strip()
        if value:
            metadata[name] = value
    age = str(ds.get("PatientAge", "") or "").strip()
    if age[:-1].isdigit() and age.endswith("Y"):
        metadata["age"] = float(age[:-1])
    return metadata


def _decode_nifti(path: Path) -> np.ndarray:
    import nibabel

    return np.asarray(nibabel.load(path).get_fdata(dtype=np.float32))


def _resize_2d(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape == (size, size):
        return image
    resized = Image.fromarray(image.astype(np.float32), mode="F").resize((size, size), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _fit_volume(volume: np.ndarray, options: ReadOptions) -> np.ndarray:
    """A size³ cube: interpolated (`resample`), or centre-cropped / zero-padded (`crop`)."""
    size = options.image_size
    if options.volume_fit == "resample":
        return np.clip(zoom(volume, [size / s for s in volume.shape], order=1, grid_mode=True, mode="nearest"), 0, 1)
    out = np.zeros((size,) * 3, dtype=np.float32)
    source, target = [], []
    for extent in volume.shape:
        take = min(extent, size)
        start_in, start_out = (extent - take) // 2, (size - take) // 2
        source.append(slice(start_in, start_in + take))
        target.append(slice(start_out, start_out + take))
    out[tuple(target)] = volume[tuple(source)]
    return out

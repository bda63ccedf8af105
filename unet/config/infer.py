"""The ``infer`` section: overlap-tile inference over whole-slide images (``pipelines.infer``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from unet.config.section import InferPrecision, Section

# Measured on CPU (docs/benchmarks.md: a 1024-px chunk in one pass is the fastest); CUDA: larger passes keep a GPU
# busy and the halo costs 1.2x instead of 1.4x (not yet measured on a GPU here).
DEFAULT_CHUNK_SIZE = {"cpu": 1024, "cuda": 2048}
DEFAULT_TASKS_PER_WORKER = {"cpu": 2, "cuda": 8}


class InferConfig(Section):
    """Overlap-tile inference over a (whole-slide) image."""

    input: str | None = Field(
        None,
        description="One slide: an OME-Zarr / Zarr image (path or s3://... URL) or a local TIFF/SVS. Or a cohort: a "
        "glob, a folder or prefix of slides, or a CSV/YAML manifest (input, optional output and level per row).",
    )
    output: str | None = Field(
        None,
        description="Output OME-Zarr store (path or s3://... URL); for a cohort a folder or prefix: slide NAME.EXT "
        "goes to OUTPUT/NAME.ome.zarr, the table of results to OUTPUT/batch_summary.csv.",
    )
    model: str = Field("models:/unet@champion", description="models:/NAME@ALIAS, models:/NAME/VERSION or a path.")
    level: int | None = Field(
        None,
        ge=0,
        description="Pyramid level to read. null: the coarsest level whose pixels are not larger than the model's "
        "(within 5%), else level 0; it is then resampled to the model's pixel size.",
    )
    pixel_size_um: float | None = Field(
        None,
        gt=0,
        description="Micrometres per pixel of the slides' level 0, for slides whose metadata states none (it "
        "overrides theirs, with a warning). null: from each slide's metadata; a slide without is refused.",
    )
    resample: bool = Field(
        True,
        description="Read every slide at the model's pixel size (the pyramid level closest to it, resampled per "
        "chunk). false: segment infer.level (default 0) as stored, whatever its pixel size (recorded in the lineage).",
    )
    min_object_area_um2: float | None = Field(
        None,
        ge=0,
        description="Objects smaller than this (square micrometres, after hole filling) are dropped before ids are "
        "assigned. null: half the 1st-percentile area of the model's training objects (0 if the model records "
        "none). 0: keep every object.",
    )
    fill_holes: bool = Field(
        True,
        description="Fill holes inside objects (background enclosed by foreground within one output chunk) before "
        "labelling.",
    )
    chunk_size: int | None = Field(
        None,
        ge=16,
        description="Output chunk side: one Zarr chunk, one Dask task, one forward pass. null: the measured default "
        "for infer.device (1024 on CPU; 2048 on CUDA).",
    )
    tile_size: int | None = Field(
        None,
        ge=16,
        description="Predict each chunk in output tiles of this side (a multiple of 2**model.depth) instead of one "
        "pass. null: one pass per chunk, smaller tiles only when a pass exceeds infer.pass_memory_mb.",
    )
    batch_size: int = Field(1, ge=1, description="Tiles per forward pass when chunks are predicted in tiles.")
    pass_memory_mb: int | None = Field(
        None,
        ge=0,
        description="Largest estimated memory (MB) of one forward pass; a chunk that needs more is predicted in "
        "smaller tiles (logged once). On CUDA, running out of memory falls back the same way. null: 2048 on CPU "
        "(measured), on CUDA 75% of the GPU's memory free when the model is loaded. 0: no limit.",
    )
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="cuda: one local worker per GPU; on a cluster, tasks ask for the Dask worker resource GPU."
    )
    compile: bool = Field(False, description="torch.compile the model (worth it on GPUs for large slides).")
    probability_dtype: Literal["uint8", "float16"] = Field("uint8", description="How probabilities are stored.")
    precision: InferPrecision = Field(
        "auto",
        description="Autocast precision; auto: bf16 where the device computes it in hardware (GPUs from Ampere on, "
        "CPUs with AVX512-BF16, AMX or Arm's bf16), fp32 elsewhere (emulated bf16 is slower than fp32).",
    )
    channels_last: bool = Field(True, description="Use the channels_last memory format.")
    blend: Literal["none", "gaussian"] = Field("none", description="Blend overlapping tiles.")
    blend_overlap: float = Field(
        0.25, ge=0, lt=1, description="Overlap of the windows blended with infer.blend: gaussian (MONAI's overlap)."
    )
    tta: bool = Field(False, description="Mirroring test-time augmentation.")
    tissue_mask: bool = Field(False, description="Skip chunks without tissue.")
    scheduler: str | None = Field(
        None,
        description="Dask scheduler address, tls://HOST:8786 (or tcp://HOST:8786 for a cluster without TLS). null: a "
        "local cluster, on 127.0.0.1 only.",
    )
    tls_ca_file: str | None = Field(
        None,
        min_length=1,
        description="CA certificate (PEM file) that signed the Dask cluster's and this job's certificates, for a "
        "tls:// infer.scheduler. null: the Dask config key distributed.comm.tls.ca-file (environment variable "
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE).",
    )
    tls_cert: str | None = Field(
        None,
        min_length=1,
        description="This job's client certificate (PEM file, signed by that CA; may hold the key as well). null: "
        "distributed.comm.tls.client.cert (DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT).",
    )
    tls_key: str | None = Field(
        None,
        min_length=1,
        description="Private key of infer.tls_cert (PEM file). null: distributed.comm.tls.client.key "
        "(DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY), else the key is in the certificate file.",
    )
    require_encryption: bool | None = Field(
        None,
        description="true: infer.scheduler must be tls://, a tcp:// one is refused. null: Dask's "
        "distributed.comm.require-encryption, else true as soon as TLS certificates are configured (here or in the "
        "Dask config). false: a tcp:// scheduler is accepted even then (the certificates unused, with a warning).",
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="Workers of the local Dask cluster. null: 1 on CPU, one per visible GPU on CUDA. A single "
        "worker runs inside the job's process (nothing to start, the model loaded once); more are processes.",
    )
    tasks_per_worker: int | None = Field(
        None,
        ge=1,
        description="Chunks in flight per worker: one in the model while the others are read or written. null: 2 "
        "on CPU, 8 on CUDA (a GPU predicts faster than one thread reads and writes).",
    )
    postprocess_processes: int | None = Field(
        None,
        ge=0,
        description="Processes per worker that label and measure predicted chunks, so the model's thread never waits "
        "for the GIL they hold (scipy's labelling, numpy's bincount). null: 0 on CPU (in the chunk's task), on CUDA "
        "half the cores of each worker's machine. Each reads the chunk back (probability; the slide's pixels for the "
        "objects table) rather than be sent it, and costs ~300 MB (it imports PyTorch to read the job's settings).",
    )
    read_cache_mb: int = Field(
        256,
        ge=0,
        description="Decoded input chunks each worker process keeps (MB), so that the halos of neighbouring chunks "
        "are decoded once: two rows of a slide's stored chunks (3 x 512 x 512 bytes each for 8-bit RGB) decode it "
        "once. 0: every window decodes the stored chunks it touches. OpenSlide formats keep their own cache.",
    )
    threshold: float = Field(
        0.5, gt=0, lt=1, description="Foreground probability threshold (also of evaluation and training validation)."
    )
    pyramid: bool = Field(
        True, description="Write multiscale levels of probability (2x2 mean) and labels (nearest) down to one chunk."
    )
    objects: bool = Field(
        True,
        description="Write the objects table in the output (tables/nuclei): one row per object (centroid, area, "
        "bbox, means).",
    )
    outlier_z: float = Field(
        3.5,
        ge=0,
        description="In a cohort, a slide whose receipt measure (objects per mm2 of tissue, median object area, "
        "uncertain share, share of tissue chunks without objects) lies further than this robust z-score (median and "
        "MAD of the cohort's) is flagged as an outlier, in batch_summary.csv, report.html and its MLflow run. 0: "
        "no cohort flags (a slide's own flags stay).",
    )
    report: bool = Field(
        True,
        description="Write OUTPUT/report.html for a cohort: one static page (no network needed) with every slide's "
        "receipt, flags and QC picture, rewritten as slides finish.",
    )
    overwrite: bool = Field(False, description="Replace an existing output.")
    resume: bool = Field(False, description="Continue an interrupted run into an existing output.")

    @model_validator(mode="after")
    def _overwrite_xor_resume(self) -> InferConfig:
        if self.overwrite and self.resume:
            raise ValueError("infer.overwrite and infer.resume cannot both be true")
        if self.tile_size and self.chunk_size and self.chunk_size % self.tile_size:
            raise ValueError(
                f"infer.chunk_size={self.chunk_size} must be a multiple of infer.tile_size={self.tile_size}"
            )
        return self

    @property
    def chunk(self) -> int:
        """``chunk_size``, or the measured default for ``device`` (docs/benchmarks.md)."""
        return self.chunk_size or DEFAULT_CHUNK_SIZE[self.device]

    @property
    def tasks(self) -> int:
        """``tasks_per_worker``, or the default for ``device``."""
        return self.tasks_per_worker or DEFAULT_TASKS_PER_WORKER[self.device]

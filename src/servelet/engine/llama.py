"""The only module that touches llama.cpp's C API: model, context, batch, logits, KV memory."""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as C
import numpy as np

log = logging.getLogger("servelet.llama")

_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level: 3 = warn, 4 = error; the rest is chatter
_AMX_BUFFER = re.compile(rb"AMX model buffer size\s*=\s*([0-9.]+) MiB")
# llama.cpp's token attributes (llama_token_attr) that make a token markup, never text.
_NOT_TEXT = C.LLAMA_TOKEN_ATTR_CONTROL | C.LLAMA_TOKEN_ATTR_UNKNOWN | C.LLAMA_TOKEN_ATTR_UNUSED
# A GGUF marks added tokens only as user-defined, text or markup alike: Gemma 3's `<h1>` and runs of spaces are text,
# its `<start_of_image>` and `[multimodal]` are markers (special in its Hugging Face tokenizer). Markers are named
# like these: `<|...|>`, `<word_word...>`, `[word]`; HTML tags have no underscore.
_MARKER = re.compile(rb"<\|[^|<>\s]+\|>|<[a-z0-9]+(?:_[a-z0-9]+)+>|\[[a-z0-9_]+\]")


class _LoadLog:
    """What llama.cpp's log said during the last model load and its API does not tell."""

    amx_weights_mib = 0.0  # weights repacked for AMX's tiles


@C.llama_log_callback
def _forward_log(level: int, text: bytes, _user_data) -> None:
    if text and (match := _AMX_BUFFER.search(text)):
        _LoadLog.amx_weights_mib = float(match.group(1))
    if level in _LEVELS and text:
        log.log(_LEVELS[level], text.decode("utf-8", "replace").rstrip())


@dataclass(frozen=True)
class BuildFacts:
    """Which llama.cpp build runs and whether AMX does: install/llama_build.py stamps its key in the version."""

    version: str
    variant: str  # amx | noamx (servelet's builds), or "stock" for a build made elsewhere
    amx_compiled: bool
    amx_weights_mib: float
    system_info: str

    def summary(self) -> str:
        amx = (
            f"AMX on ({self.amx_weights_mib:.1f} MiB of weights in AMX tiles)" if self.amx_weights_mib
            else "AMX compiled in but unused (no AMX tile permission, or no weight type AMX takes)" if self.amx_compiled
            else "AMX off"
        )
        return f"llama-cpp-python {self.version} ({self.variant} build), {amx}; {self.system_info}"


def build_facts() -> BuildFacts:
    """Read after a model loaded, so the AMX figure is that load's."""
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        version = getattr(C, "__version__", "unknown")
    _, _, local = version.partition("+")
    system_info = C.llama_print_system_info().decode("utf-8", "replace").strip()
    return BuildFacts(
        version=version,
        variant=local.split(".")[0] if local else "stock",
        amx_compiled="AMX_INT8 = 1" in system_info,
        amx_weights_mib=_LoadLog.amx_weights_mib,
        system_info=system_info,
    )


_backend_ready = False


def amx_compiled() -> bool:
    """Whether this llama.cpp build has AMX kernels (known before any model loads)."""
    _init_backend()
    return "AMX_INT8 = 1" in C.llama_print_system_info().decode("utf-8", "replace")


def _init_backend() -> None:
    """Once per process; the callback is module-level so it stays referenced (a freed one segfaults)."""
    global _backend_ready
    if not _backend_ready:
        C.llama_log_set(_forward_log, None)
        C.llama_backend_init()
        _backend_ready = True


@dataclass(frozen=True)
class ContextShape:
    """How the context is laid out: sequences, KV cells and the largest single decode call."""

    n_seq_max: int
    kv_cells: int
    n_batch: int
    unified: bool
    n_threads: int


class TokenBatch:
    """A llama_batch over numpy arrays we own, so filling a step is vectorised, not a Python loop."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_id = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        base = self.seq_id.ctypes.data
        int_p = ctypes.POINTER(C.llama_seq_id)
        # llama_batch wants one seq_id array per token; each points at its own slot of self.seq_id.
        self._seq_ptrs = (int_p * capacity)(*[ctypes.cast(base + 4 * i, int_p) for i in range(capacity)])
        self.size = 0

    def clear(self) -> None:
        self.size = 0

    def add(self, tokens, start_pos: int, seq_id: int, want_last_logits: bool, logits_rows: int = 1) -> int:
        """Append a run of tokens of one sequence; returns the batch index of the run's last token. Logits are kept
        for its last `logits_rows` tokens when `want_last_logits` (a speculated run checks each of its drafts)."""
        n = len(tokens)
        i = self.size
        if i + n > self.capacity:
            raise ValueError(f"batch overflow: {i + n} > {self.capacity}")
        self.token[i : i + n] = tokens
        self.pos[i : i + n] = np.arange(start_pos, start_pos + n, dtype=np.int32)
        self.seq_id[i : i + n] = seq_id
        self.logits[i : i + n] = 0
        if want_last_logits:
            self.logits[i + n - logits_rows : i + n] = 1
        self.size = i + n
        return i + n - 1

    def as_llama_batch(self) -> C.llama_batch:
        return C.llama_batch(
            n_tokens=self.size,
            token=self.token.ctypes.data_as(ctypes.POINTER(C.llama_token)),
            embd=None,
            pos=self.pos.ctypes.data_as(ctypes.POINTER(C.llama_pos)),
            n_seq_id=self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=self._seq_ptrs,
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )


def gguf_metadata(path: str | Path) -> dict[str, str]:
    """Every key of a GGUF file's header as llama.cpp reads it (values as text; arrays as "[a, b, ...]").

    Loads the vocabulary only, no weights: half a second where parsing the header in Python takes ten."""
    _init_backend()
    mparams = C.llama_model_default_params()
    mparams.vocab_only = True
    mparams.n_gpu_layers = 0
    model = C.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not read the GGUF header of {path}")
    try:
        buf = ctypes.create_string_buffer(4096)
        metadata = {}
        for i in range(C.llama_model_meta_count(model)):
            C.llama_model_meta_key_by_index(model, i, buf, len(buf))
            key = buf.value.decode("utf-8", errors="replace")
            C.llama_model_meta_val_str_by_index(model, i, buf, len(buf))
            metadata[key] = buf.value.decode("utf-8", errors="replace")
        return metadata
    finally:
        C.llama_model_free(model)


class LlamaModel:
    """A loaded GGUF model with one multi-sequence context (per-sequence or unified KV cells)."""

    def __init__(self, path: str | Path, extra_buffers: bool = True):
        """`extra_buffers=False` keeps the weights in plain buffers: ggml's generic kernels, not the AMX or
        repacked ones (a reference to compare those with)."""
        _init_backend()
        self.path = str(path)
        mparams = C.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.use_extra_bufts = extra_buffers
        _LoadLog.amx_weights_mib = 0.0
        self._model = C.llama_model_load_from_file(self.path.encode(), mparams)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load the model file {self.path}")
        self._vocab = C.llama_model_get_vocab(self._model)
        self.n_vocab = C.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train = C.llama_model_n_ctx_train(self._model)
        self.sliding_window = C.llama_model_n_swa(self._model)  # 0 without sliding-window layers
        self.add_bos = bool(C.llama_vocab_get_add_bos(self._vocab))
        self.name = self.metadata("general.name") or Path(self.path).stem
        template = C.llama_model_chat_template(self._model, None)
        self.chat_template = template.decode("utf-8", errors="replace") if template else None
        self.bos_text = self._special_text(C.llama_vocab_bos(self._vocab))
        self.eos_text = self._special_text(C.llama_vocab_eos(self._vocab))
        self._piece_buf = ctypes.create_string_buffer(256)  # used by the engine thread only
        self._special: dict[int, bool] = {}  # token -> is_special, filled as tokens are generated
        self._ctx = None
        self.build = build_facts()
        log.info("%s loaded on %s", self.name, self.build.summary())

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as text, or None when the file does not have it."""
        buf = ctypes.create_string_buffer(4096)
        n = C.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        text = C.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", errors="replace") if text else ""

    def open_context(self, shape: ContextShape) -> None:
        """Allocate the KV cells and compute buffers for `shape`; once per model."""
        cparams = C.llama_context_default_params()
        cparams.n_ctx = shape.kv_cells
        cparams.n_batch = shape.n_batch
        cparams.n_ubatch = min(shape.n_batch, 512)
        cparams.n_seq_max = shape.n_seq_max
        cparams.n_threads = shape.n_threads
        cparams.n_threads_batch = shape.n_threads
        cparams.kv_unified = shape.unified
        # A unified pool is shared by all sequences, so sliding-window layers need the full size too:
        # the default SWA cache (window + ubatch cells in all) cannot hold many sequences' windows.
        cparams.swa_full = shape.unified
        cparams.no_perf = True
        self._ctx = C.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create a context (out of memory for the KV cache?)")
        self._memory = C.llama_get_memory(self._ctx)
        self.kv_cells_per_seq = C.llama_n_ctx_seq(self._ctx)
        self.kv_cells = C.llama_n_ctx(self._ctx)
        self.batch = TokenBatch(shape.n_batch)

    def set_threads(self, n_threads: int) -> None:
        """Threads of every later decode (a forked instance gets its own share of the cores)."""
        C.llama_set_n_threads(self._ctx, n_threads, n_threads)

    # -- text <-> tokens -------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """`add_special`: the BOS token first, where the model wants one; `parse_special`: markup like
        `<start_of_turn>` becomes its special token (off for a user's plain text)."""
        raw = text.encode("utf-8")
        room = len(raw) + 16
        out = (C.llama_token * room)()
        n = C.llama_tokenize(self._vocab, raw, len(raw), out, room, add_special and self.add_bos, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            room = -n
            out = (C.llama_token * room)()
            n = C.llama_tokenize(self._vocab, raw, len(raw), out, room, add_special and self.add_bos, parse_special)
        return list(out[:n])

    def is_end_of_generation(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self._vocab, token))

    def is_special(self, token: int) -> bool:
        """Whether the token is markup (control, unknown, unused, or a user-defined marker) rather than text."""
        special = self._special.get(token)
        if special is None:
            attributes = C.llama_vocab_get_attr(self._vocab, token)
            text = C.llama_vocab_get_text(self._vocab, token) or b""
            user_marker = attributes & C.LLAMA_TOKEN_ATTR_USER_DEFINED and _MARKER.fullmatch(text)
            special = bool(attributes & _NOT_TEXT) or bool(user_marker)
            self._special[token] = special
        return special

    def piece(self, token: int, skip_special: bool = True) -> bytes:
        """The bytes a token adds to the text (possibly part of a UTF-8 character). A special token adds none, or
        its own text (`<start_of_image>`) when not skipped, as vLLM's skip_special_tokens does."""
        if self.is_special(token):
            if skip_special:
                return b""
            return self._render(token, special=True)
        return self._render(token, special=False)

    @functools.cached_property
    def answer_end_tokens(self) -> list[int]:
        """Tokens that end an answer copied from a context: end of text, end of turn, line breaks (found once)."""
        ends = [C.llama_vocab_eos(self._vocab), C.llama_vocab_eot(self._vocab)]
        for text in ("\n", "\n\n"):
            tokens = self.tokenize(text, add_special=False, parse_special=False)
            ends += tokens if len(tokens) == 1 else []
        return [t for t in ends if t >= 0]

    def text_pieces(self, tokens: list[int], text: str) -> list[bytes]:
        """Each token's bytes as they appear in `text` (markup as written; a BOS the tokenizer added: none)."""
        pieces = [self._render(t, special=True) for t in tokens]
        if tokens and self.add_bos and not text.startswith(self.bos_text):
            pieces[0] = b""
        return pieces

    def _render(self, token: int, special: bool) -> bytes:
        n = C.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    # -- decoding ---------------------------------------------------------------------------
    def decode(self) -> int:
        """Run the filled batch; 0 on success, 1 when no KV slot was found (see llama_decode)."""
        return C.llama_decode(self._ctx, self.batch.as_llama_batch())

    def logits_rows(self, n_rows: int) -> np.ndarray:
        """The logits of the last decode, one row per requested output, in batch order (a view, no copy)."""
        ptr = C.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_rows, self.n_vocab))

    # -- KV memory --------------------------------------------------------------------------
    def forget(self, seq_id: int) -> None:
        """Free every KV cell of a sequence."""
        C.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def copy_kv(self, source: int, target: int, keep: int) -> bool:
        """Give `target` the first `keep` positions of `source`'s KV cells (whatever `target` held is dropped).

        With per-sequence cells each sequence has a stream of its own, and llama.cpp copies only whole streams: the
        copy (a memcpy of the stream's buffers, done at the next decode) is then cut back to `keep`. In a unified
        pool the cells are shared, not copied. False when the cut is refused (memory that cannot drop a suffix)."""
        C.llama_memory_seq_cp(self._memory, source, target, -1, -1)
        if C.llama_memory_seq_rm(self._memory, target, keep, -1):
            return True
        self.forget(target)
        return False

    def trim_kv(self, seq_id: int, keep: int) -> None:
        """Drop a sequence's cells from position `keep` on (drafts its verification rejected)."""
        C.llama_memory_seq_rm(self._memory, seq_id, keep, -1)

    def kv_first_position(self, seq_id: int) -> int:
        """The oldest position a sequence still holds in every layer: sliding-window layers drop what falls out of
        their window, so a prefix can be reused only while its last window is still held. -1 when it holds none."""
        return C.llama_memory_seq_pos_min(self._memory, seq_id)

    def kv_extent(self, seq_id: int) -> int:
        """Positions a sequence holds in the KV cache (0 when it holds none)."""
        hi = C.llama_memory_seq_pos_max(self._memory, seq_id)
        return 0 if hi < 0 else hi - C.llama_memory_seq_pos_min(self._memory, seq_id) + 1

    # -- samplers (llama.cpp's own, for sampled or penalised requests) -----------------------
    def new_sampler(
        self, *, temperature, top_k, top_p, repetition_penalty, frequency_penalty, presence_penalty, seed, sampling, history
    ):
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        repeat = 1.0 if repetition_penalty is None else repetition_penalty
        if repeat != 1.0 or frequency_penalty or presence_penalty:
            penalties = C.llama_sampler_init_penalties(
                self.n_vocab, self.kv_cells_per_seq, repeat, frequency_penalty, presence_penalty
            )
            C.llama_sampler_chain_add(chain, penalties)
        if sampling:
            if top_k:
                C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(top_k))
            if top_p is not None and top_p < 1.0:
                C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(top_p, 1))
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(1.0 if temperature is None else temperature))
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed))
        else:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
        for token in history:  # the penalty looks at the prompt too, as in transformers
            C.llama_sampler_accept(chain, token)
        return chain

    def sample_with(self, sampler, batch_index: int) -> int:
        """Sample from one output; takes the token's index in the batch, not the output ordinal."""
        return C.llama_sampler_sample(sampler, self._ctx, batch_index)

    @staticmethod
    def free_sampler(sampler) -> None:
        C.llama_sampler_free(sampler)

    def close(self) -> None:
        if self._ctx:
            C.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            C.llama_model_free(self._model)
            self._model = None

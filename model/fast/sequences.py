"""The fast engine's settings and its per-request state.

:class:`FastEngineOptions` (what a :class:`~model.fast.engine.FastEngine` is built with),
:class:`ServedSequence` (one request while it is served: row, prompt, answer so far, its
constraint and drafter) and :class:`SpeculationStats` (what speculative decoding did).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.constrained import TokenConstraint
from model.fast.speculative import DEFAULT_MIN_NGRAM, PromptLookup
from model.prompting import AnswerPlan
from model.types import GenerationRequest

SPECULATION_KINDS = ("off", "refine", "all")


@dataclass
class SpeculationStats:
    """What speculative decoding did: draft tokens proposed and kept, verify steps run and
    the rows they ran, and the tokens those rows gave (kept drafts plus the model's own one)."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    rows: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class FastEngineOptions:
    """Settings of :class:`FastEngine`.

    ``max_slots=None`` sizes the KV cache from free GPU memory (8 slots on CPU).
    ``ignore_eos`` runs every request to ``max_new_tokens`` (EOS and ``</html>`` ignored):
    for benchmarks, where random weights must produce fixed-length answers.

    ``prefill_tokens`` bounds the prompt tokens one prefill runs between two decode steps:
    every running sequence waits for that prefill, so it bounds the gap between two of their
    tokens (512 tokens of a 7B: ~10-15 ms on an H100-class GPU by its FLOPs, an estimate;
    ``bench/serving.py`` measures the longest gap). With ``chunked_prefill`` the budget is
    filled across the waiting prompts and the last one is cut: a longer prompt (a refine
    carries a whole page, 1,000-2,000 tokens) is prefilled over several iterations and joins
    the decode batch after its last chunk. Without, whole prompts are taken while they fit,
    at least one however long (the engine before chunking, with 2048). When none decodes
    or more wait than decode (a burst of new prompts: many users at once), a prefill may
    take up to ``idle_prefill_tokens``: the burst starts in a few forwards instead of one
    chunk per decode step, and the few decoding rows wait longer once.

    ``prefix_cache`` keeps the KV of prompt prefixes that prompts share (the template and
    system prompt), at most ``prefix_cache_mb`` of it on the device (taken from the memory
    the KV cache leaves free), and copies it into each new row instead of prefilling it
    again (``model.fast.prefix_cache``). Both may be switched between serve() calls.
    """

    max_seq_len: int = 2048
    max_slots: int | None = None
    memory_fraction: float = 0.92
    prefill_tokens: int = 512  # prompt tokens prefilled between two decode steps, at most
    idle_prefill_tokens: int = 4096  # ... when more wait than decode (a burst)
    chunked_prefill: bool = True
    prefix_cache: bool = True
    prefix_cache_mb: int = 256
    use_cuda_graphs: bool = True
    compile_kernels: bool = True
    attention: str = "auto"  # Triton kernels on CUDA, else "sdpa"; or "matmul"
    progress_interval_s: float = 0.25
    ignore_eos: bool = False
    idle_wait: bool = True  # pass wait=True to take() when nothing runs
    # After an idle engine takes a request, how long it waits for others arriving with it
    # (many users at once): they then share one prefill instead of one each.
    burst_window_s: float = 0.005
    # "fp8": the decoder's projections in E4M3 (Hopper/Ada; model.fast.fp8_gemm), else bf16.
    weights: str = "bf16"
    # Prompt-lookup speculative decoding (model.fast.speculative, model.fast.verify): which
    # requests draft ("refine": those that rewrite a page the prompt holds; "all": every
    # document; "off"), how many tokens a draft has, and up to how many rows a verify step
    # runs (past that, plain steps: a big batch is already compute-bound enough).
    speculation: str = "refine"
    draft_tokens: int = 8
    speculative_rows: int = 16
    # The shortest match a draft is looked up by (model.fast.speculative.PromptLookup):
    # 1 drafts after any token seen before, where a longer one would leave a plain step
    # (measured both ways: bench/RESULTS.md, "Speculative refine, drafting").
    draft_min_ngram: int = DEFAULT_MIN_NGRAM
    # "fp8": K and V stored as E4M3 with a scale per token and head (model.fast.kv_cache):
    # half the cache bytes a step reads, twice the slots; "bf16": the model's dtype.
    kv_cache: str = "bf16"


@dataclass
class ServedSequence:
    """One request while the engine serves it: its plan, prompt, row and answer so far."""

    request: GenerationRequest
    plan: AnswerPlan
    prompt: list[int]
    max_new: int
    started: float
    constraint: TokenConstraint | None = None
    # Its banned strings run on the device from this state (0: none there).
    ban_state: int = 0
    row: int = -1
    # Prompt tokens whose KV is in its row (earlier chunks, a shared prefix copied in).
    prefilled: int = 0
    first_token_at: float | None = None
    last_progress: float = 0.0
    generated: list[int] = field(default_factory=list)
    # Stays empty: forced tokens go one decode step each here (StopRule without jump_forward).
    forced: list[int] = field(default_factory=list)
    launched: int = 0  # input tokens of steps launched for it (a step may be in flight)
    drafter: PromptLookup | None = None  # drafts for verify steps (None: plain steps only)
    done: bool = False  # finished or cancelled: tokens of steps in flight are dropped

    @property
    def host_masked(self) -> bool:
        """Its mask must be filled by the host before each step (a grammar)."""
        return self.constraint is not None and self.ban_state == 0

    @property
    def host_constraint(self) -> TokenConstraint | None:
        """Its constraint when the host advances it (not one run on the device)."""
        return self.constraint if self.ban_state == 0 else None

    @property
    def is_form(self) -> bool:
        return self.plan.grammar is not None

    @property
    def cached(self) -> int:
        """Positions of its KV written once every launched step has run."""
        return len(self.prompt) + self.launched

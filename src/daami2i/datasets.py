"""Synthetic detection / segmentation datasets: generate under the trace, turn word maps into
instances, write COCO files. Resumable, and sharded by rank under ``accelerate launch``.

Layout of ``out``::

    dataset.json                   the prompts and every setting that changes the output (model included)
    images/000000001.png ...       one PNG per sample (image id = prompt index * K + k + 1)
    shards/rank-0.jsonl ...        one JSON line per finished sample (written after its image)
    instances.json, captions.json  COCO files, merged from every shard at the end

Sample ``(prompt i, k)`` is generated with seed ``seed + image id``, so a sample does not depend on
which process made it or on how often the run was interrupted. A sample counts as done once its
line is in a shard file; a run that is killed and started again skips the done samples and
appends the rest. A folder holds one dataset: a run whose prompts or settings (model, words, scheme,
thresholds, sampling) differ from the ones recorded is refused, naming what differs. Categories are
the words (lemmas when spaCy is used), numbered in sorted order; annotation ids follow image ids.
A word that cannot be annotated in a sample (e.g. it lies past the text encoder's 77 tokens) is
skipped with a warning and recorded in the sample's shard line; :func:`summary` counts them.

>>> words_in("a red circle and a blue square", ["circle", "square", "triangle"])
['circle', 'square']
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, QueryError
from .heatmaps import masks as M
from .heatmaps.maps import HeatMap
from .heatmaps.schemes import SCHEMES, word_map
from .sampling import GUIDANCE_MAX, STEPS_MAX
from .sampling import SEED_LIMIT as TORCH_SEED_LIMIT

FORMAT = "daami2i-dataset"
VERSION = 2
SEED_LIMIT = TORCH_SEED_LIMIT // 2  # sample seeds (seed + image id) stay below torch's limit
MAX_PER_PROMPT = 100_000  # samples per prompt (-k); a dataset of more is many runs
# the names users know the settings by (the CLI's options)
SETTING_NAMES = {
    "model": "model (-m)",
    "words": "words (--words)",
    "nouns": "noun finder (spaCy pipeline)",
    "images_per_prompt": "images per prompt (-k)",
    "scheme": "scheme (--scheme)",
    "method": "threshold method (--method)",
    "tau": "threshold (--tau)",
    "min_fragment": "min_fragment",
    "merge_iou": "merge_iou",
    "segmentation": "segmentation (--segmentation)",
    "seed": "seed (--seed)",
    "steps": "steps (--steps)",
    "guidance": "guidance (--guidance)",
    "save_experiments": "experiments (--experiments)",
    "spacy_model": "spaCy model (--spacy-model)",
}


def _number(value: Any, name: str, lo: float, hi: float, hi_open: bool = False, fix: str = "") -> float:
    """``value`` as a finite float in [lo, hi] (or [lo, hi)), else a ConfigError naming the setting."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        span = f"[{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"{SETTING_NAMES.get(name, name)} must be a finite number in {span}, got {value!r}{fix}")
    return float(value)


def _integer(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value >= hi):
        span = f">= {lo}" if hi is None else f"from {lo} to {hi - 1}"
        raise ConfigError(f"{SETTING_NAMES.get(name, name)} must be an integer {span}, got {value!r}")
    return value


@dataclass
class DatasetConfig:
    """How samples are made: sampling, which scheme turns word maps into masks, and how.

    ``model`` names the model in ``dataset.json`` (a resumed run must use the same one); by default
    :func:`generate_shard` derives it from the pipeline (:func:`pipeline_identity`).
    """

    images_per_prompt: int = 1
    scheme: str = "guided"
    method: str = "tau"  # "tau" or "otsu"
    tau: float = 0.4
    min_fragment: float = 0.05
    merge_iou: float | None = 0.3
    segmentation: str = "auto"  # "auto", "polygon" or "rle"
    seed: int = 0
    steps: int = 25
    guidance: float = 4.0
    save_experiments: bool = False
    spacy_model: str | None = None  # pipeline name or folder for noun lookup (when no words are given)
    model: str | None = None  # the model's identity (see model_identity); None: derived from the pipeline

    def check(self) -> None:
        """Every setting checked (types, ranges, finite numbers): a ConfigError names the first bad one."""
        _integer(self.images_per_prompt, "images_per_prompt", 1, MAX_PER_PROMPT + 1)
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme (--scheme) must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.method not in ("tau", "otsu"):
            raise ConfigError(f"threshold method (--method) must be 'tau' or 'otsu', got {self.method!r}")
        _number(self.tau, "tau", 0.0, 1.0, hi_open=True, fix=" (it applies to the min-max normalised map, e.g. 0.4)")
        _number(self.min_fragment, "min_fragment", 0.0, 1.0, fix=" (a fraction of the largest component's area)")
        if self.merge_iou is not None:
            _number(self.merge_iou, "merge_iou", 0.0, 1.0, fix=" (a box IoU; None disables merging)")
        if self.segmentation not in ("auto", "polygon", "rle"):
            raise ConfigError(
                f"segmentation (--segmentation) must be 'auto', 'polygon' or 'rle', got {self.segmentation!r}"
            )
        _integer(self.seed, "seed", 0, SEED_LIMIT)
        _integer(self.steps, "steps", 1, STEPS_MAX + 1)
        _number(self.guidance, "guidance", 0.0, GUIDANCE_MAX, fix=" (the classifier-free guidance scale, e.g. 7.5)")
        if not isinstance(self.save_experiments, bool):
            raise ConfigError(f"save_experiments must be True or False, got {self.save_experiments!r}")
        for name in ("spacy_model", "model"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{SETTING_NAMES.get(name, name)} must be a non-empty string or None, got {value!r}")


def read_prompts(path: Path) -> list[str]:
    """One prompt per line of a UTF-8 text file; blank lines and lines starting with '#' are skipped.

    A missing file, a folder, a file that is not UTF-8 (UTF-16, Latin-1, binary) or one without
    prompts is a ConfigError that says how to fix it.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"the prompts path {path} is a folder: pass a text file with one prompt per line")
    if not path.is_file():
        raise ConfigError(f"prompt file {path} does not exist: write one prompt per line")
    data = path.read_bytes()

    def convert(encoding: str) -> str:
        return f"convert it to UTF-8 (e.g. iconv -f {encoding} -t UTF-8 {path} > prompts-utf8.txt)"

    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(
            f"prompt file {path} is UTF-16 text (it starts with a UTF-16 byte-order mark); prompt files are "
            f"UTF-8: {convert('UTF-16')}"
        )
    if b"\x00" in data:
        raise ConfigError(
            f"prompt file {path} is not UTF-8 text: it holds NUL bytes (UTF-16 without a byte-order mark, or a "
            f"binary file): {convert('UTF-16')}"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"prompt file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line} is not UTF-8; "
            f"Latin-1 or Windows-1252?): {convert('LATIN1')}"
        ) from None
    prompts = [ln.strip() for ln in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts (one per line; '#' starts a comment)")
    return prompts


def parse_words(text: str | None) -> list[str] | None:
    """The vocabulary of a comma-separated ``--words`` value (None when not given).

    >>> parse_words("Circle, square,,circle")
    ['circle', 'square']
    """
    if text is None:
        return None
    return check_vocabulary(text.split(","), given=text)


def check_vocabulary(vocabulary: Sequence[str] | None, given: Any = None) -> list[str] | None:
    """Entries stripped, lower-cased, de-duplicated (in order); an empty vocabulary is a ConfigError."""
    if vocabulary is None:
        return None
    if isinstance(vocabulary, str) or not all(isinstance(v, str) for v in vocabulary):
        raise ConfigError(f"the words must be a list of strings, got {vocabulary!r}")
    words = list(dict.fromkeys(" ".join(v.split()).lower() for v in vocabulary if v.strip()))
    if not words:
        shown = given if given is not None else list(vocabulary)
        raise ConfigError(
            f"--words {shown!r} names no words: give comma-separated words to annotate, e.g. --words circle,square"
        )
    return words


def words_in(prompt: str, vocabulary: Sequence[str]) -> list[str]:
    """The entries of ``vocabulary`` (words or phrases) that occur in ``prompt`` as whole words,
    case-insensitively, in the order of their first occurrence.

    >>> words_in("A flower pot, two cats and a flower", ["cat", "cats", "flower pot", "pot"])
    ['flower pot', 'cats']
    """
    import re

    found = []
    for entry in dict.fromkeys(v.strip().lower() for v in vocabulary if v.strip()):
        phrase = r"\s+".join(re.escape(w) for w in entry.split())
        m = re.search(rf"(?<![\w-]){phrase}(?![\w-])", prompt.lower())
        if m:
            found.append((m.start(), entry))
    # a phrase hides the single words inside it ("flower pot" wins over "pot")
    kept = [(i, e) for i, e in found if not any(e != f and e in f.split() for _, f in found)]
    return [e for _, e in sorted(kept)]


def nouns(prompt: str, model: str | None = None) -> list[tuple[str, str]]:
    """(word, lemma) of every noun of ``prompt``, in order, with an installed spaCy pipeline.

    ``model`` is a spaCy pipeline name or folder; by default the first installed of
    ``en_core_web_sm`` / ``_md`` / ``_lg``. spaCy and its pipelines are optional and never downloaded
    at run time.
    """
    nlp = _spacy_pipeline(model)
    out: list[tuple[str, str]] = []
    for tok in nlp(prompt):
        word = tok.text.lower()
        if tok.pos_ in ("NOUN", "PROPN") and word not in [w for w, _ in out]:
            out.append((word, (tok.lemma_ or tok.text).lower()))
    return out


@functools.lru_cache(maxsize=4)
def _spacy_pipeline(model: str | None) -> Any:
    try:
        import spacy
    except ImportError as exc:
        raise ConfigError(
            "finding nouns needs spaCy and an English pipeline (pip install 'daami2i[nlp]' en_core_web_sm); "
            "or pass the words to look for (--words circle,square,triangle)"
        ) from exc
    names = [model] if model is not None else ["en_core_web_sm", "en_core_web_md", "en_core_web_lg"]
    for name in names:
        try:
            return spacy.load(name)
        except OSError:
            continue
    raise ConfigError(
        f"no spaCy pipeline {' / '.join(names)} is installed: install one (pip install en_core_web_sm), "
        "pass --spacy-model with a pipeline name or folder, or pass --words"
    )


def spacy_identity(model: str | None = None) -> str:
    """The spaCy pipeline that finds nouns, as dataset.json records it ("en_core_web_sm 3.8.0").

    Loads it (a ConfigError if spaCy or the pipeline is missing), so call it before any work.
    """
    meta = getattr(_spacy_pipeline(model), "meta", {}) or {}
    return f"{meta.get('lang', '?')}_{meta.get('name', '?')} {meta.get('version', '?')}"


def _folder_digest(folder: Path) -> str:
    """A short digest of a model folder: every file's relative path and size, and the text of its
    JSON configs (so a moved or copied folder keeps its identity; other weights change it)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts)):
        rel = path.relative_to(folder).as_posix()
        size = path.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if path.suffix == ".json" and size < 2**20:
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def model_identity(model: str) -> str:
    """How ``dataset.json`` names a model given as the CLI's ``-m``, without loading it.

    ``shapes`` (the embedded model) and a local pipeline folder are named by a digest of their
    files (:func:`_folder_digest`), ``tiny`` is the random test pipeline, anything else is a hub id.

    >>> model_identity("tiny")
    'tiny (random weights)'
    """
    from .shapes.model import model_path

    if model == "tiny":
        return "tiny (random weights)"
    local = Path(model).expanduser()
    if model == "shapes" or (local.exists() and local.resolve() == model_path().resolve()):
        return f"shapes@{_folder_digest(model_path())}"
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ConfigError(
                f"{local} is not a diffusers pipeline folder (no model_index.json): pass a pipeline folder, "
                "a hub id, or 'shapes'"
            )
        return f"{local.resolve().name}@{_folder_digest(local)}"
    return f"hub:{model}"


def pipeline_identity(pipe: Any) -> str:
    """:func:`model_identity` of the folder or hub id a pipeline was loaded from (else its class name)."""
    name = getattr(pipe, "name_or_path", None)
    return model_identity(str(name)) if name else f"{type(pipe).__name__} (unnamed)"


def settings_of(config: DatasetConfig, vocabulary: Sequence[str] | None) -> dict[str, Any]:
    """Every setting that changes the output, as ``dataset.json`` records it.

    ``config.model`` must be set. Without a vocabulary the noun finder (spaCy pipeline) is loaded
    and recorded, so a missing spaCy is an error here, before anything is written.
    """
    config.check()
    if config.model is None:
        raise ConfigError("DatasetConfig.model is not set: pass model_identity(...) or let generate_shard set it")
    words = check_vocabulary(vocabulary)
    settings = asdict(config)
    settings["words"] = sorted(words) if words is not None else None
    settings["nouns"] = spacy_identity(config.spacy_model) if words is None else None
    if words is not None:  # the noun finder is not used
        settings["spacy_model"] = None
    return settings


def shard_of(n_prompts: int, rank: int, world: int) -> list[int]:
    """The prompt indices of process ``rank`` among ``world``: every ``world``-th from ``rank``.

    >>> shard_of(5, 1, 2)
    [1, 3]
    """
    if not 0 <= rank < world:
        raise ConfigError(f"rank must be in [0, {world}), got {rank}")
    return list(range(rank, n_prompts, world))


def _records(out: Path) -> Iterable[dict[str, Any]]:
    """The finished samples' shard lines (a line cut short by a kill is skipped: that sample is redone)."""
    for shard in sorted((out / "shards").glob("rank-*.jsonl")):
        for line in shard.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                int(rec["image_id"])
            except (ValueError, KeyError, TypeError):
                continue
            yield rec


def _done(out: Path) -> set[int]:
    return {int(r["image_id"]) for r in _records(out)}


def _first_difference(old: Sequence[str], new: Sequence[str]) -> str:
    for i, (a, b) in enumerate(zip(old, new, strict=False)):
        if a != b:
            return f"prompt {i + 1} is {a!r} there and {b!r} here"
    return f"the folder has {len(old)} prompts, this run {len(new)}"


def check_out(out: Path, prompts: list[str], settings: dict[str, Any]) -> None:
    """Refuse to mix runs, without writing anything: ``out`` must be a new or empty folder, or hold a
    dataset made from the same prompts and settings (``dataset.json``); the error names what differs."""
    out = Path(out)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            where = "is a file" if p == out else f"cannot be made: {p} is a file"
            raise ConfigError(f"the output folder {out} {where}: choose a folder for the dataset (-o/--out)")
    _check_writable(out)
    meta = out / "dataset.json"
    if meta.is_file():
        try:
            old = json.loads(meta.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{meta} is not readable ({exc}): the folder cannot be resumed; choose another output folder"
            ) from None
        if old.get("format") != FORMAT:
            raise ConfigError(f"{meta} is not a daami2i dataset file: choose another output folder")
        if old.get("version") != VERSION:
            raise ConfigError(
                f"{out} was made by an older daami2i (dataset format {old.get('version')}), which did not record the "
                "model and the words, so a resumed run could mix them: choose another output folder (or delete it "
                "to start again)"
            )
        if old.get("prompts") != prompts:
            diff = _first_difference(old.get("prompts") or [], prompts)
            raise ConfigError(
                f"{out} holds a dataset made from other prompts ({diff}): pass the same prompt file to resume, or "
                "choose another output folder (or delete it to start again)"
            )
        recorded = old.get("settings") or {}
        diffs = [
            f"{SETTING_NAMES.get(k, k)}: {recorded.get(k)!r} there, {settings.get(k)!r} in this run"
            for k in [*SETTING_NAMES, *sorted(set(recorded) | set(settings))]
            if recorded.get(k) != settings.get(k)
        ]
        diffs = list(dict.fromkeys(diffs))
        if diffs:
            raise ConfigError(
                f"{out} holds a dataset made with other settings ({'; '.join(diffs)}): resume with the folder's "
                "settings, or choose another output folder (or delete it to start again)"
            )
    elif out.is_dir() and any(p.name not in ("shards", "images") for p in out.iterdir()):
        raise ConfigError(f"{out} is not empty and is not a daami2i dataset folder: choose another output folder")


def _check_writable(out: Path) -> None:
    """A ConfigError unless files can be made in ``out`` (or in its nearest existing parent, where it will
    be made): an empty probe folder is made and removed at once, so nothing is left behind."""
    import tempfile

    base = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".daami2i-probe-", dir=base))
    except OSError as exc:
        raise ConfigError(
            f"the output folder {out} cannot be written ({base}: {exc.strerror or exc}): choose a folder you can "
            "write to (-o/--out)"
        ) from None


def prepare_out(out: Path, prompts: list[str], settings: dict[str, Any]) -> None:
    """:func:`check_out`, then record the prompts and settings in ``out/dataset.json`` (a new folder)."""
    check_out(out, prompts, settings)
    meta = Path(out) / "dataset.json"
    if not meta.is_file():
        meta.parent.mkdir(parents=True, exist_ok=True)
        info = {"format": FORMAT, "version": VERSION, "prompts": prompts, "settings": settings}
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
        os.replace(tmp, meta)


class DatasetWarning(UserWarning):
    """A sample's word could not be annotated, or a prompt has no word to annotate."""


def _short(prompt: str, n: int = 60) -> str:
    return prompt if len(prompt) <= n else prompt[: n - 3] + "..."


def generate_shard(
    pipe: Any,
    prompts: list[str],
    out: Path,
    config: DatasetConfig,
    vocabulary: Sequence[str] | None = None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> int:
    """Generate this process's samples that are not done yet; returns how many it made.

    Every setting is checked, and (rank 0) the folder claimed, before the first sample. A word that
    cannot be annotated in a sample is skipped with a :class:`DatasetWarning` and listed under
    ``skipped`` in the sample's shard line; :func:`summary` counts them.
    """
    from dataclasses import replace

    from tqdm.auto import tqdm

    from .tracing import trace

    config.check()
    words = check_vocabulary(vocabulary)
    if config.model is None:
        config = replace(config, model=pipeline_identity(pipe))
    settings = settings_of(config, words)
    if rank == 0:
        prepare_out(out, prompts, settings)
    else:
        check_out(out, prompts, settings)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    done = _done(out)
    k_per = config.images_per_prompt
    todo = [(i, k) for i in shard_of(len(prompts), rank, world) for k in range(k_per) if i * k_per + k + 1 not in done]
    shard = out / "shards" / f"rank-{rank}.jsonl"
    if shard.is_file() and shard.stat().st_size and not shard.read_bytes().endswith(b"\n"):
        with shard.open("a", encoding="utf-8") as f:  # end a line cut short by a kill
            f.write("\n")
    made = 0
    warned: set[tuple[int, str]] = set()
    bar = tqdm(todo, desc=f"dataset (rank {rank})", unit="image", disable=not progress, file=sys.stderr)
    for i, k in bar:
        prompt = prompts[i]
        image_id = i * k_per + k + 1
        if words is not None:
            pairs = [(w, w) for w in words_in(prompt, words)]
        else:
            pairs = nouns(prompt, config.spacy_model)
        if not pairs and (i, "") not in warned:
            warned.add((i, ""))
            what = f"none of the words {', '.join(words)}" if words is not None else "no nouns"
            warnings.warn(
                f"prompt {i + 1} ({_short(prompt)!r}) has {what}: its images get no annotations", DatasetWarning, 2
            )
        gen = torch.Generator(device="cpu").manual_seed(config.seed + image_id)
        with trace(pipe) as trc:
            image = pipe(
                prompt=prompt, num_inference_steps=config.steps, guidance_scale=config.guidance, generator=gen
            ).images[0]
        ghm = trc.compute_global_heat_map()
        anns: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        for word, lemma in pairs:
            try:
                heat = word_map(ghm, word, config.scheme)
                up = HeatMap(heat).expand_as(image)  # min-max normalised, at the image's size
                mask = M.binarize(up, config.method, config.tau)  # type: ignore[arg-type]
                fields = [
                    inst.annotation(config.segmentation)  # type: ignore[arg-type]
                    for inst in M.instances(mask, config.min_fragment, config.merge_iou)
                ]
            except QueryError as exc:  # e.g. the word lies past the tokenizer's length limit
                skipped.append({"word": word, "reason": str(exc)})
                if (i, word) not in warned:
                    warned.add((i, word))
                    warnings.warn(
                        f"prompt {i + 1} ({_short(prompt)!r}): word {word!r} not annotated: {exc}", DatasetWarning, 2
                    )
                continue
            anns.extend({"category": lemma, "word": word, **f} for f in fields)
        name = f"{image_id:09d}.png"
        tmp = out / "images" / f".{name}.tmp.png"
        image.save(tmp)
        os.replace(tmp, out / "images" / name)
        if config.save_experiments:
            trc.to_experiment(out / "experiments" / f"{image_id:09d}", seed=config.seed + image_id, overwrite=True)
        record = {
            "image_id": image_id,
            "file_name": f"images/{name}",
            "prompt_index": i,
            "sample": k,
            "caption": prompt,
            "height": image.size[1],
            "width": image.size[0],
            "seed": config.seed + image_id,
            "words": [w for w, _ in pairs],
            "skipped": skipped,
            "annotations": anns,
        }
        with shard.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        made += 1
    return made


@dataclass
class Summary:
    """What a dataset folder holds, counted over every shard."""

    images: int
    annotations: int
    categories: int
    skipped_words: int  # (sample, word) pairs that could not be annotated
    samples_with_skips: int
    samples_without_words: int  # samples whose prompt has none of the words (or no nouns)

    def __str__(self) -> str:
        text = f"{self.images} image(s), {self.annotations} annotation(s), {self.categories} categorie(s)"
        if self.skipped_words:
            text += (
                f"; {self.skipped_words} word(s) skipped in {self.samples_with_skips} sample(s) (see the warnings; "
                "each is listed under 'skipped' in shards/)"
            )
        if self.samples_without_words:
            text += f"; {self.samples_without_words} sample(s) whose prompt has no word to annotate"
        return text


def summary(out: Path) -> Summary:
    """Counts of ``out``'s finished samples: images, annotations, categories, skipped words."""
    records: dict[int, dict[str, Any]] = {}
    for rec in _records(Path(out)):
        records.setdefault(int(rec["image_id"]), rec)
    anns = [a for r in records.values() for a in r.get("annotations", [])]
    return Summary(
        images=len(records),
        annotations=len(anns),
        categories=len({a["category"] for a in anns}),
        skipped_words=sum(len(r.get("skipped", [])) for r in records.values()),
        samples_with_skips=sum(1 for r in records.values() if r.get("skipped")),
        samples_without_words=sum(1 for r in records.values() if "words" in r and not r["words"]),
    )


def merge(out: Path) -> tuple[Path, Path]:
    """Merge every shard into ``instances.json`` (COCO) and ``captions.json``; returns their paths."""
    records: dict[int, dict[str, Any]] = {}
    for rec in _records(Path(out)):
        records.setdefault(int(rec["image_id"]), rec)  # a sample written twice counts once
    if not records:
        raise ConfigError(f"{out} has no finished samples to merge")
    cats = sorted({a["category"] for r in records.values() for a in r["annotations"]})
    cat_id = {c: j + 1 for j, c in enumerate(cats)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    for image_id in sorted(records):
        r = records[image_id]
        images.append({"id": image_id, "file_name": r["file_name"], "height": r["height"], "width": r["width"]})
        captions.append({"id": image_id, "image_id": image_id, "caption": r["caption"]})
        for a in r["annotations"]:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_id[a["category"]],
                    "bbox": a["bbox"],
                    "area": a["area"],
                    "segmentation": a["segmentation"],
                    "iscrowd": a["iscrowd"],
                }
            )
    categories = [{"id": cat_id[c], "name": c, "supercategory": "object"} for c in cats]
    inst = {"info": {"description": "daami2i synthetic dataset"}, "images": images, "annotations": annotations}
    inst["categories"] = categories
    paths = out / "instances.json", out / "captions.json"
    for path, data in zip(paths, (inst, {"images": images, "annotations": captions}), strict=True):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)
    return paths


# -- evaluation --------------------------------------------------------------------------------------
def _read_json(path: Path, role: str) -> Any:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"the {role} file {path} is a folder: pass its COCO JSON file (e.g. {path / 'instances.json'})"
        )
    if not path.is_file():
        raise ConfigError(f"the {role} file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the {role} file {path} is not JSON ({exc}): pass a COCO file") from None


def _ids(items: Iterable[int], n: int = 5) -> str:
    items = sorted(items)
    return ", ".join(map(str, items[:n])) + (f" and {len(items) - n} more" if len(items) > n else "")


def _check_gt(gt: Any, path: Path) -> None:
    """A COCO instances file with images (id, height, width), annotations and categories."""
    fix = "--gt needs a COCO instances file (images, annotations, categories), such as instances.json"
    if not isinstance(gt, dict):
        kind = "a results list" if isinstance(gt, list) else f"a JSON {type(gt).__name__}"
        raise ConfigError(f"the ground truth {path} is {kind}, not a COCO instances file: {fix}")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(gt.get(k), list)]
    if missing:
        raise ConfigError(
            f"the ground truth {path} has no {' / '.join(repr(k) for k in missing)} list (its keys: "
            f"{', '.join(map(repr, gt)) or 'none'}): {fix}"
        )
    for img in gt["images"]:
        if not isinstance(img, dict) or not all(isinstance(img.get(k), int) for k in ("id", "height", "width")):
            raise ConfigError(f"the ground truth {path} has an image without integer id, height and width: {img!r}")
    image_ids = {img["id"] for img in gt["images"]}
    cat_ids = {c.get("id") for c in gt["categories"] if isinstance(c, dict)}
    for a in gt["annotations"]:
        need = [k for k in ("image_id", "category_id", "segmentation", "bbox", "area") if k not in a]
        if need:
            raise ConfigError(f"the ground truth {path} has an annotation without {', '.join(need)}: {_short(str(a))}")
        if a["image_id"] not in image_ids:
            raise ConfigError(f"the ground truth {path} has an annotation of image {a['image_id']}, not in its images")
        if a["category_id"] not in cat_ids:
            raise ConfigError(
                f"the ground truth {path} has an annotation of category {a['category_id']}, not in its categories"
            )


def _predictions(raw: Any, path: Path, gt: dict[str, Any], gt_path: Path) -> list[dict[str, Any]]:
    """The predictions as a results list on the ground truth's category ids, checked against it:
    every prediction's image is one of the ground truth's, with the same size."""
    gt_images = {img["id"]: img for img in gt["images"]}
    gt_cats = {c["name"]: c["id"] for c in gt["categories"]}
    partial = ""
    if isinstance(raw, dict):  # an instances file: re-key its categories by name onto the ground truth's
        if not isinstance(raw.get("annotations"), list) or not isinstance(raw.get("categories"), list):
            missing = [k for k in ("annotations", "categories") if not isinstance(raw.get(k), list)]
            raise ConfigError(
                f"the predictions {path} are a JSON object without {' / '.join(repr(k) for k in missing)}: pass a COCO "
                "instances file (annotations and categories, matched to the ground truth's by name) or a results list"
            )
        names = {c["id"]: c["name"] for c in raw["categories"] if isinstance(c, dict) and "id" in c and "name" in c}
        pred_images = [img for img in raw.get("images") or [] if isinstance(img, dict)]
        for img in pred_images:
            want = gt_images.get(img.get("id"))
            if want is not None and (img.get("height"), img.get("width")) != (want["height"], want["width"]):
                raise ConfigError(
                    f"image {img.get('id')} is {img.get('height')}x{img.get('width')} in the predictions {path} but "
                    f"{want['height']}x{want['width']} in the ground truth {gt_path}: they are not the same images"
                )
            named = (img.get("file_name"), want.get("file_name")) if want is not None else (None, None)
            if all(isinstance(n, str) for n in named) and named[0] != named[1]:
                raise ConfigError(
                    f"image {img.get('id')} is {named[0]!r} in the predictions {path} but {named[1]!r} in the ground "
                    f"truth {gt_path}: they are not the same images (evaluate a dataset against its own ground truth)"
                )
        covered = {img.get("id") for img in pred_images} & set(gt_images)
        if pred_images and len(covered) < len(gt_images):  # (told once the files are known to match)
            partial = f"the predictions {path} cover {len(covered)} of the ground truth's {len(gt_images)} images"
        unknown = sorted({str(names.get(a.get("category_id"))) for a in raw["annotations"]} - set(gt_cats))
        results = [
            {**a, "category_id": gt_cats[names[a["category_id"]]], "score": a.get("score", 1.0)}
            for a in raw["annotations"]
            if names.get(a.get("category_id")) in gt_cats
        ]
        if unknown:
            warnings.warn(
                f"the predictions {path} have categories the ground truth does not: {', '.join(unknown)} "
                f"(ground truth: {', '.join(sorted(gt_cats))}); their predictions are left out",
                DatasetWarning,
                3,
            )
    elif isinstance(raw, list):
        bad = next((a for a in raw if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a), None)
        if bad is not None:
            raise ConfigError(
                f"the predictions {path} are a list, but an entry is not a COCO result (image_id, category_id, "
                f"segmentation or bbox, score): {_short(str(bad))}"
            )
        unknown_ids = {a["category_id"] for a in raw} - set(gt_cats.values())
        if unknown_ids:
            warnings.warn(
                f"the predictions {path} have category ids the ground truth does not: {_ids(unknown_ids)}; "
                "their predictions are left out",
                DatasetWarning,
                3,
            )
        results = [{**a, "score": a.get("score", 1.0)} for a in raw if a["category_id"] not in unknown_ids]
    else:
        raise ConfigError(
            f"the predictions {path} are a JSON {type(raw).__name__}: pass a COCO results list or instances file"
        )
    if not results:
        raise ConfigError(
            f"{path} holds no predictions for the ground truth's categories ({', '.join(sorted(gt_cats)) or 'none'})"
        )
    foreign = {a["image_id"] for a in results} - set(gt_images)
    if foreign:
        raise ConfigError(
            f"the predictions {path} are for image ids the ground truth {gt_path} does not have ({_ids(foreign)}; "
            f"the ground truth has {len(gt_images)} image(s), ids {_ids(gt_images)}): evaluate predictions against "
            "the ground truth of the same images"
        )
    kind = "segmentation" if all("segmentation" in a for a in results) else "bbox"
    for a in results:
        if kind not in a:
            raise ConfigError(f"the predictions {path} mix results with and without {kind}: {_short(str(a))}")
        img = gt_images[a["image_id"]]
        seg = a.get("segmentation")
        if isinstance(seg, dict) and list(seg.get("size", [])) != [img["height"], img["width"]]:
            raise ConfigError(
                f"a prediction's RLE mask for image {a['image_id']} is {seg.get('size')} (height, width) but the "
                f"ground truth {gt_path} has that image at {[img['height'], img['width']]}: they are not the same "
                "images"
            )
        a.pop("id", None)
    if partial:
        warnings.warn(
            f"{partial}; the others count as missed (is this the dataset the ground truth belongs to?)",
            DatasetWarning,
            3,
        )
    return results


def evaluate(pred_path: Path, gt_path: Path) -> dict[str, Any]:
    """COCO AP (segm and bbox, pycocotools) and mask / box mIoU of a prediction file against ground truth.

    ``pred_path`` may be a COCO results list or a full instances file (as :func:`merge` writes);
    categories are matched by name. mIoU: per (image, category) the IoU of the union of predicted
    masks (boxes) with the union of true ones, averaged per category, then over categories.
    Files that do not belong together (other images, other sizes, no categories) are a ConfigError
    that says what does not match.
    """
    import contextlib
    import io

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_raw = _read_json(gt_path, "ground-truth")
    _check_gt(gt_raw, Path(gt_path))
    results = _predictions(_read_json(pred_path, "predictions"), Path(pred_path), gt_raw, Path(gt_path))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_raw
        gt.createIndex()
    out: dict[str, Any] = {"per_category": {}}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        for kind in ("segm", "bbox"):
            ev = COCOeval(gt, dt, kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out[f"{kind}_AP"] = float(ev.stats[0])
            out[f"{kind}_AP50"] = float(ev.stats[1])
    ious: dict[str, dict[int, list[float]]] = {"segm": {}, "bbox": {}}
    for img in gt.getImgIds():
        info = gt.loadImgs(img)[0]
        h, w = info["height"], info["width"]
        for cat in gt.getCatIds():
            g = gt.loadAnns(gt.getAnnIds(imgIds=img, catIds=cat))
            d = dt.loadAnns(dt.getAnnIds(imgIds=img, catIds=cat))
            if not g and not d:
                continue
            for kind in ("segm", "bbox"):
                gm = _union(g, gt, kind, h, w)
                dm = _union(d, dt, kind, h, w)
                union = (gm | dm).sum()
                ious[kind].setdefault(cat, []).append(float((gm & dm).sum() / union) if union else 1.0)
    for kind in ("segm", "bbox"):
        per = {gt.loadCats(c)[0]["name"]: float(np.mean(v)) for c, v in ious[kind].items()}
        out[f"{kind}_mIoU"] = float(np.mean(list(per.values()))) if per else 0.0
        for name, v in per.items():
            out["per_category"].setdefault(name, {})[f"{kind}_IoU"] = v
    return out


def _union(anns: Iterable[dict], coco: Any, kind: str, h: int, w: int) -> Any:
    import numpy as np

    m = np.zeros((h, w), dtype=bool)
    for a in anns:
        if kind == "segm":
            m |= coco.annToMask(a).astype(bool)
        else:
            x, y, bw, bh = a["bbox"]
            m[int(round(y)) : int(round(y + bh)), int(round(x)) : int(round(x + bw))] = True
    return m

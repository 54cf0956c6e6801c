"""Tests for memreason.model.export and `memreason export`: the export leaves memreason.

The round-trip tests load the export in a fresh Python process that never imports memreason (checked at
its end), and compare with what ``memreason.load(run)`` generates in this process.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from memreason.errors import ConfigError, ModelLoadError
from memreason.model import export as export_module
from memreason.model.export import ExportResult, export_run, read_export
from memreason.model.gguf_export import gguf_filename
from memreason.model.tokens import TokenScheme
from memreason.traces import MEMORY, REASON, Step, Trace

QUESTIONS = ["Is Paris the capital of France? (3)", "Is the Pacific Ocean larger than the Atlantic Ocean?",
             "Do fish sleep?"]
MAX_NEW = 24
# Teacher-forced text with control tokens in it: logits are compared at every position.
FORCED_SUFFIX = "<prefix_0><prefix_1><prefix_2><memory_0> Paris is the capital of France.\n<reason_1> So it is"

# Runs in a fresh interpreter: transformers only. argv[1] is a JSON list of jobs; prints one JSON line.
WITHOUT_MEMREASON = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
results = []
for job in json.loads(sys.argv[1]):
    kwargs = {"gguf_file": job["gguf_file"]} if job.get("gguf_file") else {}
    tok = AutoTokenizer.from_pretrained(job["dir"], **kwargs)
    model = AutoModelForCausalLM.from_pretrained(job["dir"], dtype=torch.float32, **kwargs).eval()
    out = {"encoded": [], "generated": [], "texts": [], "logits": None}
    for prompt in job["prompts"]:
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**ids, max_new_tokens=job["max_new_tokens"])  # generation_config: the rest
        new = generated[0, ids["input_ids"].shape[1]:].tolist()
        out["encoded"].append(ids["input_ids"][0].tolist())
        out["generated"].append(new)
        out["texts"].append(tok.decode(new, skip_special_tokens=True))
    if job.get("forced"):
        ids = tok(job["forced"], add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out["logits"] = model(**ids).logits[0].tolist()
    out["eos"] = model.generation_config.eos_token_id
    results.append(out)
imported = sorted(m for m in sys.modules if m == "memreason" or m.startswith("memreason."))
print(json.dumps({"results": results, "imported_memreason": imported}))
"""


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_data(path, n=16):
    with open(path, "w") as handle:
        for i in range(n):
            trace = Trace(f"Is Paris the capital of France? ({i})",
                          (Step(MEMORY, "Paris is the capital of France."), Step(REASON, "So it is true.")), "True")
            handle.write(json.dumps(trace.to_dict()) + "\n")


def make_run(root, *, tie: bool = True, seed: int = 0, base: str | None = None, scale: float = 1.0):
    """A complete lora+tokens run directory of a tiny Llama, built the way ``memreason train`` wraps the
    model (``wrap_model``), with random LoRA factors and token rows standing in for training: the merge then
    changes every MLP weight and the new rows. (Greedy decoding of a random 2-layer model falls into a loop
    at once, of newlines at small scales; at this scale the loop runs through control tokens.)"""
    from memreason.model.runs import RunInfo, SavedWeights
    from memreason.model.tokens import TokenScheme, add_scheme_tokens
    from memreason.train.recipe import wrap_model

    root.mkdir(parents=True, exist_ok=True)
    if base is None:  # a tiny random Llama, saved as the base
        tokenizer = build_tiny_tokenizer()
        build_tiny_model(len(tokenizer), tie=tie, seed=seed).save_pretrained(root / "base")
        tokenizer.save_pretrained(root / "base")
        model, base = build_tiny_model(len(tokenizer), tie=tie, seed=seed), str(root / "base")
    else:  # a real base model, by the name memreason.model.load takes
        from memreason.model import load

        model, tokenizer = load(base, dtype="float32", device="cpu")
    scheme = TokenScheme()
    ids = add_scheme_tokens(model, tokenizer, scheme)
    peft_model = wrap_model(model, "lora+tokens", ids, 8, 16, 0.0, "mlp")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    run = root / "run"
    for name in ("best", "last"):
        peft_model.save_pretrained(run / name, save_embedding_layers=False)
    tokenizer.save_pretrained(run / "tokenizer")
    RunInfo(base_model=base, task="strategyqa", prompt_style="chat", scheme=scheme, mode="lora+tokens",
            token_ids=tuple(ids), status="complete", task_version=1, data={"n_val_generated": 4},
            best=SavedWeights("checkpoint-4", 4, val_accuracy=0.75, val_loss=1.25),
            last=SavedWeights("checkpoint-6", 6, val_accuracy=0.5, val_loss=1.5)).to_json(run)
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("export-runs") / "tied")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A lora+tokens run that ``memreason train`` really trained (as in test_runs)."""
    from memreason.train import load_config, main

    root = tmp_path_factory.mktemp("trained")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    _write_data(root / "data.jsonl")
    torch.set_num_threads(1)
    cfg = load_config(None, [f"model.name_or_path={root / 'base'}", f"data.source={root / 'data.jsonl'}",
                             "data.task=strategyqa", "data.train_split=null", "data.val_size=4", "optim.epochs=2",
                             "optim.batch_size=4", "optim.lr=1e-2", "optim.warmup_steps=0", "eval.every_steps=2",
                             "eval.max_new_tokens=6", f"output_dir={root / 'run'}"])
    return main(cfg, progress=False)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> ExportResult:
    return export_run(run, tmp_path_factory.mktemp("exports") / "f32", gguf=True, gguf_type="f32")


@pytest.fixture(scope="module")
def exported_q8(run, tmp_path_factory) -> ExportResult:
    return export_run(run, tmp_path_factory.mktemp("exports") / "q8", gguf=True, gguf_type="q8_0")


def memreason_reference(run, questions=QUESTIONS, max_new_tokens=MAX_NEW) -> dict:
    """What memreason generates for QUESTIONS: prompts, generated token ids (up to memreason's stop), texts,
    answers; and the merged model's logits on a forced text."""
    import memreason
    from memreason.prompts import render_prompt

    mr = memreason.load(run, device="cpu", max_new_tokens=max_new_tokens)
    traces = mr.answer_batch(questions, batch_size=1)
    prompts = [render_prompt(q, mr.task, mr.tokenizer, mr.prompt_style) for q in questions]
    ids = [list(t.meta["token_ids"]) for t in traces]  # the ids memreason's own generation produced
    assert all(len(i) == t.meta["n_tokens"] for i, t in zip(ids, traces))
    forced = prompts[0] + FORCED_SUFFIX
    with torch.no_grad():
        logits = mr.model(**mr.tokenizer(forced, add_special_tokens=False, return_tensors="pt")).logits[0]
    return {"prompts": prompts, "ids": ids, "traces": traces, "forced": forced, "logits": logits,
            "task": mr.task, "tokenizer": mr.tokenizer, "reasoner": mr}


@pytest.fixture(scope="module")
def reference(run):
    return memreason_reference(run)


def _without_memreason(tmp_path, *jobs) -> list[dict]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", WITHOUT_MEMREASON, json.dumps(list(jobs))], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["imported_memreason"] == [], "the check process imported memreason"
    return out["results"]


def job(directory, prompts, *, gguf_file=None, forced=None, max_new_tokens=MAX_NEW) -> dict:
    return {"dir": str(directory), "prompts": list(prompts), "gguf_file": gguf_file, "forced": forced,
            "max_new_tokens": max_new_tokens}


def assert_same_greedy_tokens(out: dict, reference: dict, min_distinct: int = 2) -> None:
    """The check process encoded memreason's prompts to memreason's ids and generated memreason's tokens."""
    tokenizer = reference["tokenizer"]
    for i, trace in enumerate(reference["traces"]):
        assert out["encoded"][i] == tokenizer(reference["prompts"][i], add_special_tokens=False)["input_ids"]
        ours = reference["ids"][i]
        if trace.meta["stopped"] == "answer":  # memreason also stops at the end of the answer line
            assert out["generated"][i][:len(ours)] == ours
        else:  # eos or length: plain generate() stops at exactly the same token
            assert out["generated"][i] == ours
        assert out["texts"][i][:len(trace.meta["raw"])] == trace.meta["raw"]
    # the comparison is not vacuous: the generations use several different tokens
    assert len({t for ids in reference["ids"] for t in ids}) >= min_distinct


def _gguf_alone(result: ExportResult, tmp_path):
    """The GGUF file copied into a directory of its own: it must stand without the HF files."""
    alone = tmp_path / "gguf-only"
    alone.mkdir(parents=True)
    shutil.copy(result.gguf, alone / result.gguf.name)
    return alone


# -- the plain Hugging Face checkpoint -----------------------------------------------------------------


def test_export_writes_a_plain_checkpoint_and_nothing_memreason_specific_is_needed(exported):
    names = set(exported.files)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "README.md", "memreason.json", gguf_filename("f32")} <= names
    assert not any(n.startswith("adapter_") or n.endswith((".bin", ".pt", ".pkl")) for n in names)
    config = json.loads((exported.out_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert not any(p.name.endswith(".partial") for p in exported.out_dir.parent.iterdir())


def test_exported_weights_hold_the_merged_adapter(run, exported):
    from safetensors.torch import load_file

    from memreason.model.runs import RunInfo

    info = RunInfo.from_json(run)
    merged = load_file(exported.out_dir / "model.safetensors")
    base = load_file(run.parent / "base" / "model.safetensors")
    adapter = load_file(run / "best" / "adapter_model.safetensors")
    # LoRA (mlp) changed the weights, and the trained token rows are in the embedding, at their ids
    assert not torch.equal(merged["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])
    rows = adapter["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    torch.testing.assert_close(merged["model.embed_tokens.weight"][list(info.token_ids)], rows, rtol=0, atol=0)


def test_exported_tokenizer_keeps_the_control_tokens_at_their_trained_ids(run, exported):
    from transformers import AutoTokenizer

    from memreason.model.runs import RunInfo

    info = RunInfo.from_json(run)
    tok = AutoTokenizer.from_pretrained(exported.out_dir)
    tokens = info.scheme.tokens()
    assert tok.convert_tokens_to_ids(tokens) == list(info.token_ids)
    ids = tok("<memory_0> fact", add_special_tokens=False)["input_ids"]
    assert ids[0] == info.token_ids[tokens.index("<memory_0>")]
    assert tok.decode(ids, skip_special_tokens=True).startswith("<memory_0>")  # not special: kept when decoding
    assert tok.chat_template == AutoTokenizer.from_pretrained(run / "tokenizer").chat_template


def test_generation_config_stops_at_memreasons_eos_ids_and_is_greedy(run, exported):
    from transformers import GenerationConfig

    from memreason.generate import eos_ids
    from memreason.model.runs import load_run

    model, tokenizer, _ = load_run(run, device="cpu", merge=True)
    config = GenerationConfig.from_pretrained(exported.out_dir)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    assert eos == eos_ids(model, tokenizer) == list(exported.eos_token_ids) == [tokenizer.eos_token_id]
    assert config.do_sample is False and config.max_new_tokens == 256
    assert config.pad_token_id == tokenizer.pad_token_id


OPENED = "<prefix_0><prefix_1><prefix_2><answer_0><answer_1><answer_2><answer_3> The answer is:"


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """An untied run (separate output head and its own trained output rows), exported with an f32 GGUF."""
    root = tmp_path_factory.mktemp("untied")
    run = make_run(root / "untied", tie=False, seed=3)
    return export_run(run, root / "export", gguf=True), memreason_reference(run)


@pytest.fixture(scope="module")
def outside(exported, exported_q8, reference, untied, tmp_path_factory):
    """One process without memreason loads the HF export, the f32 GGUF and the q8_0 GGUF (each GGUF alone in
    a directory), and the untied run's HF export and f32 GGUF; each generates for memreason's prompts (the
    q8_0 one also with the answer line opened)."""
    tmp = tmp_path_factory.mktemp("outside")
    prompts, forced = reference["prompts"], reference["forced"]
    opened = [p + OPENED for p in prompts]
    untied_export, untied_reference = untied
    hf, f32, q8, untied_hf, untied_f32 = _without_memreason(
        tmp, job(exported.out_dir, prompts, forced=forced),
        job(_gguf_alone(exported, tmp / "f32"), prompts, gguf_file=exported.gguf.name, forced=forced),
        job(_gguf_alone(exported_q8, tmp / "q8"), prompts + opened, gguf_file=exported_q8.gguf.name, forced=forced),
        job(untied_export.out_dir, untied_reference["prompts"], forced=untied_reference["forced"]),
        job(_gguf_alone(untied_export, tmp / "untied"), untied_reference["prompts"], gguf_file=untied_export.gguf.name,
            forced=untied_reference["forced"]))
    return {"hf": hf, "f32": f32, "q8": q8, "untied_hf": untied_hf, "untied_f32": untied_f32}


def test_hf_export_gives_memreasons_greedy_tokens_in_a_process_without_memreason(outside, reference):
    assert_same_greedy_tokens(outside["hf"], reference)
    assert torch.equal(torch.tensor(outside["hf"]["logits"]), reference["logits"])  # bit for bit


# -- GGUF -----------------------------------------------------------------------------------------------


def test_gguf_f32_loads_back_in_transformers_with_identical_greedy_tokens(outside, reference):
    assert_same_greedy_tokens(outside["f32"], reference)
    # measured: bit-identical (the Q/K permutation is exact and f32 is stored as is)
    torch.testing.assert_close(torch.tensor(outside["f32"]["logits"]), reference["logits"], rtol=0, atol=1e-6)
    assert outside["f32"]["eos"] == reference["tokenizer"].eos_token_id


def test_gguf_q8_0_gives_the_same_answers(outside, reference, capsys):
    from memreason.generate import generate_texts

    task, mr, q8 = reference["task"], reference["reasoner"], outside["q8"]
    opened = generate_texts(mr.model, mr.tokenizer, [p + OPENED for p in reference["prompts"]],
                            max_new_tokens=MAX_NEW, batch_size=1)
    report = []
    for i, question in enumerate(QUESTIONS):
        free_mem, free_q8 = reference["traces"][i].answer, task.extract(q8["texts"][i])
        opened_mem = task.extract("The answer is:" + opened[i].text)
        opened_q8 = task.extract("The answer is:" + q8["texts"][len(QUESTIONS) + i])
        report.append(f"{question!r}: free generation memreason {free_mem!r} / q8_0 {free_q8!r}; "
                      f"answer line opened: memreason {opened_mem!r} / q8_0 {opened_q8!r}")
        assert free_q8 == free_mem and opened_q8 == opened_mem
    error = (torch.tensor(q8["logits"]) - reference["logits"]).abs().max().item()
    scale = reference["logits"].abs().max().item()
    report.append(f"max |Δ logit| {error:.4f} on logits up to {scale:.2f}")
    assert error < 0.05 * scale  # quantisation error stays small
    with capsys.disabled():
        print("\nq8_0 answers (tiny random run):\n  " + "\n  ".join(report))


def test_an_untied_run_exports_its_output_head_and_round_trips(untied, outside):
    import gguf

    result, reference = untied
    assert json.loads((result.out_dir / "config.json").read_text())["tie_word_embeddings"] is False
    assert "output.weight" in {t.name for t in gguf.GGUFReader(str(result.gguf)).tensors}
    for out in (outside["untied_hf"], outside["untied_f32"]):
        assert_same_greedy_tokens(out, reference)
        torch.testing.assert_close(torch.tensor(out["logits"]), reference["logits"], rtol=0, atol=1e-6)


def test_a_run_trained_by_memreason_train_exports_and_round_trips(trained_run, tmp_path):
    """The adapter layout ``memreason train`` really writes merges into the export (loaded here with plain
    transformers; the process-without-memreason check is done on the synthetic runs above)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memreason.model.runs import RunInfo

    result = export_run(trained_run, tmp_path / "export")
    info = RunInfo.from_json(trained_run)
    record = json.loads((result.out_dir / "memreason.json").read_text())
    assert record["metrics"] == {k: v for k, v in info.best.to_dict().items() if k.startswith("val_")}
    assert "val_accuracy" in record["metrics"]
    reference = memreason_reference(trained_run)
    tokenizer = AutoTokenizer.from_pretrained(result.out_dir)
    model = AutoModelForCausalLM.from_pretrained(result.out_dir).eval()
    with torch.no_grad():
        logits = model(**tokenizer(reference["forced"], add_special_tokens=False, return_tensors="pt")).logits[0]
        for prompt, ours in zip(reference["prompts"], reference["ids"]):
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
            generated = model.generate(**ids, max_new_tokens=MAX_NEW)[0, ids["input_ids"].shape[1]:].tolist()
            assert generated[:len(ours)] == ours  # a barely trained tiny model may repeat one token
    assert torch.equal(logits, reference["logits"])


def test_gguf_metadata_is_what_llama_cpp_reads(exported, exported_q8, reference):
    import gguf

    tokenizer = reference["tokenizer"]
    reader = gguf.GGUFReader(str(exported.gguf))
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt2"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(tokenizer) == fields["llama.vocab_size"].contents()
    memory = tokenizer.convert_tokens_to_ids("<memory_0>")
    assert tokens[memory] == "<memory_0>" and types[memory] == gguf.TokenType.USER_DEFINED
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert fields["llama.attention.head_count_kv"].contents() == 2
    names = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied
    assert set(names.values()) == {gguf.GGMLQuantizationType.F32}
    q8 = {t.name: t.tensor_type for t in gguf.GGUFReader(str(exported_q8.gguf)).tensors}
    assert q8["blk.0.attn_q.weight"] == q8["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert q8["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_model_card_names_base_scheme_prompt_metrics_and_version(run, exported, reference):
    import memreason
    from memreason.model.runs import RunInfo

    info = RunInfo.from_json(run)
    card = (exported.out_dir / "README.md").read_text()
    record = json.loads((exported.out_dir / "memreason.json").read_text())
    assert info.base_model in card and "lora+tokens" in card
    assert "paper (P=3 prefix tokens, S=4 kind tokens per step)" in card and "`<memory_0>`=" in card
    assert "| prompt style | chat |" in card
    from memreason.prompts import render_prompt

    example = render_prompt(record["example"]["question"], reference["task"], reference["tokenizer"], "chat")
    assert record["example"]["prompt"] == example and example.rstrip("\n") in card
    assert f"| val_loss | {info.best.val_loss:.4g} |" in card and f"step {info.best.step}" in card
    assert f"memreason {memreason.__version__}" in card
    assert record["metrics"]["val_accuracy"] == info.best.val_accuracy
    assert record["token_ids"] == list(info.token_ids) and record["prompt_style"] == "chat"


def test_read_export_reads_what_memreason_needs_to_prompt_an_export(run, exported):
    record = read_export(exported.out_dir)
    assert (record["task"], record["prompt_style"], record["scheme"]) == ("strategyqa", "chat", TokenScheme().to_dict())
    assert read_export(run) is None and read_export(run / "missing") is None


# -- output directory safety ------------------------------------------------------------------------------


def test_non_empty_out_dir_is_refused_before_loading_anything(run, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(export_module, "load_run", fail)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty; pass --overwrite"):
        export_run(run, tmp_path / "taken")
    with pytest.raises(ConfigError, match="not a memreason export.*refusing to delete"):
        export_run(run, tmp_path / "taken", overwrite=True)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="is under a file"):
        export_run(run, tmp_path / "taken" / "notes.txt" / "out")
    with pytest.raises(ConfigError, match="would replace the run"):
        export_run(run, run.parent, overwrite=True)
    with pytest.raises(ModelLoadError, match="run directory not found"):
        export_run(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown GGUF type 'q4_0'"):
        export_run(run, tmp_path / "out", gguf=True, gguf_type="q4_0")


def test_overwrite_replaces_an_earlier_export_completely(run, tmp_path):
    first = export_run(run, tmp_path / "out")
    (first.out_dir / "stale.txt").write_text("from before")
    second = export_run(run, tmp_path / "out", checkpoint="last", overwrite=True)
    assert not (second.out_dir / "stale.txt").exists()
    assert json.loads((second.out_dir / "memreason.json").read_text())["checkpoint"] == "last"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old copies left


def test_a_failed_export_leaves_no_directory_that_looks_complete(run, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "write_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        export_run(run, tmp_path / "out", gguf=True)
    assert list(tmp_path.iterdir()) == []
    earlier = export_run(run, tmp_path / "kept")
    with pytest.raises(OSError, match="disk full"):
        export_run(run, tmp_path / "kept", gguf=True, overwrite=True)
    assert sorted(p.name for p in earlier.out_dir.iterdir()) == list(earlier.files)  # the old export is intact


# -- the CLI, and memreason eval on an export ------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch):
    import memreason.cli

    if "export" not in memreason.cli.VERB_MODULES:
        monkeypatch.setattr(memreason.cli, "VERB_MODULES", memreason.cli.VERB_MODULES + ["export"])
    return memreason.cli.main


def test_cli_missing_run_is_one_clear_line_and_exit_2(cli, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_module, "load_run", lambda *a, **k: pytest.fail("loaded a model"))
    assert cli(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run directory not found" in err
    assert cli(["export", str(tmp_path), "--out", str(tmp_path / "out"), "--gguf-type", "q8_0"]) == 2
    assert "--gguf-type needs --gguf" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_choices_are_the_librarys():
    from memreason.cli import export as cli_export
    from memreason.model.export import EXPORT_DTYPES
    from memreason.model.gguf_export import GGUF_TYPES

    assert cli_export.GGUF_TYPES == GGUF_TYPES and cli_export.DTYPES == EXPORT_DTYPES


def test_cli_exports_and_prints_what_it_wrote(cli, run, tmp_path, capsys):
    import gguf
    from safetensors import safe_open

    assert cli(["export", str(run), "--out", str(tmp_path / "out"), "--gguf", "--gguf-type", "f16",
                "--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert f"to {tmp_path / 'out'}" in printed and "model-f16.gguf" in printed and "model.safetensors" in printed
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "out" / "model-f16.gguf")).tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.F16
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_memreason_eval_on_an_export_matches_eval_on_the_run(cli, run, exported, tmp_path):
    _write_data(tmp_path / "questions.jsonl", n=3)
    common = ["--data", str(tmp_path / "questions.jsonl"), "--task", "strategyqa", "--max-new-tokens", "8",
              "--device", "cpu"]
    assert cli(["eval", "--model", str(run), "--out", str(tmp_path / "from-run")] + common) == 0
    assert cli(["eval", "--model", str(exported.out_dir), "--out", str(tmp_path / "from-export")] + common) == 0

    def rows(name):
        lines = (tmp_path / name / "results.jsonl").read_text().splitlines()
        return {r["id"]: (r["prompt"], r["raw"], r["predicted"]) for r in map(json.loads, lines)}

    assert len(rows("from-run")) == 3 and rows("from-export") == rows("from-run")


# -- the real model ---------------------------------------------------------------------------------------


@pytest.mark.smollm2
def test_smollm2_run_export_round_trip(tmp_path, capsys):
    """A lora+tokens run on the embedded SmolLM2 (the adapter slightly perturbed from its initialisation, so
    the merge changes every MLP weight): the HF export gives memreason's greedy tokens outside memreason,
    and the q8_0 GGUF gives the same answers. (Training itself is covered by the tiny trained run above.)"""
    from memreason.generate import generate_texts
    from memreason.model.loading import DEFAULT_MODEL

    torch.set_num_threads(2)
    run = make_run(tmp_path / "smollm2", base=DEFAULT_MODEL, scale=1e-3)
    result = export_run(run, tmp_path / "export", gguf=True, gguf_type="q8_0")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (result.out_dir / "README.md").read_text()
    questions = ["Is the Pacific Ocean larger than the Atlantic Ocean?", "Do fish sleep?"]
    reference = memreason_reference(run, questions, max_new_tokens=16)
    mr, prompts = reference["reasoner"], reference["prompts"]
    opened = [p + "The answer is:" for p in prompts]  # every prompt then yields an answer
    ours = generate_texts(mr.model, mr.tokenizer, opened, max_new_tokens=4, batch_size=1)
    hf, q8 = _without_memreason(tmp_path, job(result.out_dir, prompts, max_new_tokens=16),
                                job(_gguf_alone(result, tmp_path), opened, gguf_file=result.gguf.name, max_new_tokens=4))
    assert_same_greedy_tokens(hf, reference, min_distinct=5)
    report = []
    for i, question in enumerate(questions):
        mem_answer = mr.task.extract("The answer is:" + ours[i].text)
        q8_answer = mr.task.extract("The answer is:" + q8["texts"][i])
        report.append(f"{question!r}: memreason and the HF export {reference['traces'][i].meta['raw']!r}; answer "
                      f"line opened: memreason {ours[i].text!r} -> {mem_answer!r}, q8_0 {q8['texts'][i]!r} -> {q8_answer!r}")
        assert mem_answer is not None and q8_answer == mem_answer
    with capsys.disabled():
        print("\nSmolLM2 export round trip:\n  " + "\n  ".join(report))

"""eval.py -- one job: measurements on run folders, and the export of a run's result for deployment.

    python eval.py RUN_DIR [--step N] [--tasks t1 t2] [--problems 200] [--k 4] [--max-new-tokens M]
    python eval.py compare RUN_A RUN_B ... --out plots/
    python eval.py export RUN_DIR --out DIR [--step N] [--merge [--dtype bfloat16]]

What the paper measures (docs: fst-method.md), one function each:
- evaluate():     mean@k, accuracy (share of samples with reward >= 1: partial credit is not skill) and
                  pass@k (context_opt.measure_accuracy, which training's validation uses too).
- two_by_two():   {base, trained weights} x {seed, evolved prompt}: how much each kind of weight adds.
- kl_to_base():   drift KL(pi_trained || pi_base), exact per token, in chunks over time.
- report():       all of the above on one checkpoint, plus forgetting (other tasks, trained vs base).
- compare():      paper-style PNG plots across runs and the steps each run needs to reach a target.
- export():       a folder plain transformers (and so vLLM) loads with no fst code.
The base model is always the same weights with the LoRA adapter disabled: never a second copy.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import context_opt
import fst
import pool
import rewards
import rollout
from plumbing import checkpoints, config, dist as torchrun, models, runlog

WEIGHTS, PROMPTS = ("base", "trained"), ("seed", "evolved")
# Forgetting by default (--forgetting names others): a general benchmark (gsm8k, skipped where its data
# cannot be reached), multi-step arithmetic, and a one-step task a 135M model gets right sometimes.
FORGETTING_TASKS = ("gsm8k", "arithmetic", "compare")


# ---------------------------------------------------------------------------------- accuracy
evaluate = context_opt.measure_accuracy  # training's validation measures with it too


def two_by_two(accuracy) -> dict:
    """accuracy(weights: "base"|"trained", prompt: "seed"|"evolved") -> float, called once per cell.
    Returns the four cells plus what each kind of weight adds over base weights + seed prompt."""
    cells = {w: {p: accuracy(w, p) for p in PROMPTS} for w in WEIGHTS}
    base = cells["base"]["seed"]
    return {**cells,
            "slow_gain": cells["trained"]["seed"] - base,      # weights alone (seed prompt)
            "fast_gain": cells["base"]["evolved"] - base,      # prompt alone (base weights)
            "both_gain": cells["trained"]["evolved"] - base}


# ---------------------------------------------------------------------------------- drift (KL)
@torch.no_grad()
def exact_token_kl(model, batch, chunk_size: int = 64) -> torch.Tensor:
    """batch (rollout.Batch) -> KL(pi_adapter_on || pi_adapter_off) per completion token, [R, T],
    exact over the vocabulary: sum_v p log(p/q). Padding columns are 0. Both decoder passes keep only
    hidden states [R, T, H]; lm_head + log-softmax run on `chunk_size` positions at a time."""
    head = model.get_output_embeddings()
    h_p = rollout.completion_hidden_states(model, batch)
    with model.disable_adapter():
        h_q = rollout.completion_hidden_states(model, batch)
    pieces = []
    for s in range(0, h_p.shape[1], chunk_size):
        logp = head(h_p[:, s:s + chunk_size]).float().log_softmax(-1)              # [R, c, V]
        with model.disable_adapter():                                              # lm_head may carry LoRA
            logq = head(h_q[:, s:s + chunk_size]).float().log_softmax(-1)
        pieces.append((logp.exp() * (logp - logq)).sum(-1))
        del logp, logq
    return torch.cat(pieces, dim=1) * batch.completion_mask.float()


def kl_to_base(model, tok, task, problems, system_prompt, *, n_samples=1, max_new_tokens, temperature,
               chunk_size=64, generator=None, top_p=1.0, stop=(), micro_batch=16, max_rows=None,
               dist=None) -> float:
    """Sample n_samples completions per problem from the TRAINED policy, then average the exact per-token
    KL(pi_trained || pi_base) over all completion tokens (under torchrun: summed over the ranks' shares)."""
    dist = dist or torchrun.Dist()
    total, tokens = 0.0, 0
    context = pool.as_context(system_prompt)
    prompts = [rollout.encode_chat(tok, context.messages(task, p)) for p in dist.shard(list(problems))]
    if prompts:
        ro = rollout.sample(model, tok, prompts, [n_samples] * len(prompts), max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, stop=list(stop), generator=generator,
                            max_rows=max_rows)
        device = next(model.parameters()).device
        with rollout.eval_mode(model):
            for s in range(0, len(ro.texts), micro_batch):
                batch = rollout.collate(ro.prompt_ids[s:s + micro_batch], ro.completion_ids[s:s + micro_batch],
                                        tok.pad_token_id, device)
                total += exact_token_kl(model, batch, chunk_size).sum().item()
                tokens += int(batch.completion_mask.sum().item())
    total, tokens = dist.total(torch.tensor([total, tokens], dtype=torch.float64, device="cpu")).tolist()
    return total / max(tokens, 1)


# ---------------------------------------------------------------------------------- one checkpoint
def make_task(name: str, cfg):
    """The run's own task with its config section; another task with its defaults and the run's task seed."""
    return rewards.make_task(cfg.task if name == cfg.task.name else rewards.TaskConfig(name=name, seed=cfg.task.seed))


def run_tasks(run: Path, cfg) -> list[str]:
    """The tasks a run trained on, in order (a continual run has several), from its train rows."""
    seen = [r["task"] for r in read_metrics(run) if r.get("kind", "train") == "train" and "task" in r]
    return list(dict.fromkeys(seen)) or [cfg.task.name]


def report(run: Path, *, step=None, tasks=None, forgetting=None, n=None, k=None, max_new_tokens=None,
           seed=0, batch_size=None, overrides=(), dist=None) -> dict:
    """Every measurement on one checkpoint. Writes RUN/eval/step_N.json; returns the same dict.
    Under torchrun (dist) every measurement splits its problems over the ranks; rank 0 writes."""
    dist = dist or torchrun.Dist()
    cfg = fst.load_config(str(run / "config.yaml"), list(overrides))
    ckpt = checkpoints.find_checkpoint(run, step)
    state = checkpoints.load_trainer_state(ckpt)
    device = models.pick_device(cfg, str(run / "config.yaml"))
    model, tok = models.load_model(cfg.model, device, adapter_path=str(ckpt))
    model.eval()
    n, k = n or cfg.eval.n, k or cfg.eval.k
    s = cfg.sampling
    max_new_tokens = max_new_tokens or s.max_new_tokens
    evolved = pool.best_context(ckpt)  # instruction and worked examples, from the pool
    tasks = tasks or run_tasks(run, cfg)
    gen = lambda: dist.generator(device, seed)  # the same draws in every cell  # noqa: E731
    sampling = dict(max_new_tokens=max_new_tokens, temperature=s.temperature, top_p=s.top_p, stop=s.stop,
                    max_rows=s.max_rows)
    out = {"run": str(run), "checkpoint": ckpt.name, "step": int(state["step"]), "mode": cfg.mode,
           "n": n, "k": k, "seed": seed, "sampling": sampling, "evolved_prompt": evolved and evolved.text(),
           "evolved_context": evolved and dataclasses.asdict(evolved), "reflector": runlog.reflector_used(run),
           "notes": [], "tasks": {}, "forgetting": {}}
    if evolved is None:
        out["notes"].append(f"{ckpt / 'pool.json'} missing: evolved prompt = seed prompt")
    elif cfg.mode == "rl":
        out["notes"].append("rl run: the pool holds the seed prompt only, so 'evolved' repeats 'seed'")

    for name in tasks:
        task = make_task(name, cfg)
        problems = task.load("test")[:n]
        seed_text = rewards.seed_prompt(task, cfg.task.system_prompt, continual=bool(cfg.schedule))
        prompt = {"seed": pool.Context(seed_text, (), evolved.demo_format if evolved else cfg.fast.demo_format)}
        prompt["evolved"] = evolved if evolved is not None else prompt["seed"]
        cache = {}

        def cell(w, p):  # same prompt text, same weights -> measured once (rl: evolved == seed)
            key = (w, prompt[p])
            if key not in cache:
                cache[key] = evaluate(model, tok, task, problems, prompt[p], k=k, generator=gen(),
                                      use_adapter=w == "trained", batch_size=batch_size, dist=dist, **sampling)
            return cache[key]
        tables = {f"two_by_two_{m}": two_by_two(lambda w, p, m=m: cell(w, p)[m])
                  for m in ("mean_at_k", "accuracy", "pass_at_k")}
        drift = {f"{p}_prompt": kl_to_base(model, tok, task, problems, prompt[p], generator=gen(),
                                           chunk_size=cfg.train.logprob_chunk, dist=dist, **sampling) for p in PROMPTS}
        out["tasks"][name] = {"seed_prompt": prompt["seed"].instruction, "accuracy": cell("trained", "evolved"),
                              **tables, "kl_to_base": drift}

    others = forgetting if forgetting is not None else [t for t in FORGETTING_TASKS if t not in tasks]
    for name in others:
        out["forgetting"][name] = forgetting_on(name, cfg, n, lambda task, problems, use_adapter: evaluate(
            model, tok, task, problems, task.default_system_prompt, k=k, generator=gen(), use_adapter=use_adapter,
            batch_size=batch_size, dist=dist, **sampling), dist)

    path = run / "eval" / f"step_{out['step']}.json"
    if dist.is_main:
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
    out["json_path"] = str(path)
    return out


def forgetting_on(name: str, cfg, n: int, measure, dist) -> dict:
    """Task `name` under its own default prompt, base weights against trained: measure(task, problems,
    use_adapter) -> evaluate's dict. A task whose data cannot be reached is skipped, said in one line."""
    try:
        task = make_task(name, cfg)
        problems = task.load("test")[:n]
    except Exception as e:
        if dist.is_main:
            print(f"[eval] forgetting on {name} skipped: {e}", file=sys.stderr)
        return {"skipped": f"{type(e).__name__}: {e}"}
    res = {w: measure(task, problems, w == "trained") for w in WEIGHTS}
    res["delta_mean_at_k"] = res["trained"]["mean_at_k"] - res["base"]["mean_at_k"]
    return res


def markdown(out: dict) -> str:
    f = lambda x: "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"  # noqa: E731
    lines = [f"# {out['run']} @ {out['checkpoint']} (mode {out['mode']}, n={out['n']}, k={out['k']})", ""]
    lines += [f"> {note}" for note in out["notes"]]
    lines += [f"reflector: {runlog.reflector_line(out['reflector'])}", ""] if out.get("reflector") else []
    for name, t in out["tasks"].items():
        m, p = t["two_by_two_mean_at_k"], t["two_by_two_pass_at_k"]
        lines += [f"## {name}", "",
                  f"accuracy (trained weights, evolved prompt): mean@{out['k']} {f(t['accuracy']['mean_at_k'])}, "
                  f"pass@{out['k']} {f(t['accuracy']['pass_at_k'])}", "",
                  f"| weights \\ prompt | seed | evolved |  (mean@{out['k']} / pass@{out['k']})", "|---|---|---|"]
        lines += [f"| {w} | {f(m[w]['seed'])} / {f(p[w]['seed'])} | {f(m[w]['evolved'])} / {f(p[w]['evolved'])} |"
                  for w in WEIGHTS]
        lines += ["", f"gain over base+seed: weights {f(m['slow_gain'])}, prompt {f(m['fast_gain'])}, "
                  f"both {f(m['both_gain'])}", "",
                  "| drift KL(trained \\|\\| base) | per token |", "|---|---|",
                  f"| seed prompt | {t['kl_to_base']['seed_prompt']:.5f} |",
                  f"| evolved prompt | {t['kl_to_base']['evolved_prompt']:.5f} |", ""]
    if out["forgetting"]:
        lines += ["## forgetting (other tasks, their own default prompts)", "",
                  f"| task | base mean@{out['k']} | trained mean@{out['k']} | delta |", "|---|---|---|---|"]
        for name, r in out["forgetting"].items():
            lines.append(f"| {name} | skipped: {r['skipped']} | | |" if "skipped" in r else
                         f"| {name} | {f(r['base']['mean_at_k'])} | {f(r['trained']['mean_at_k'])} | "
                         f"{r['delta_mean_at_k']:+.3f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- across runs
read_metrics = runlog.read_metrics  # metrics.jsonl rows (the name users of eval.py call)


def val_curve(rows, task=None) -> list[dict]:
    """Eval rows of the policy as deployed (prompt "best" if logged, else "seed"), by step."""
    ev = [r for r in rows if r.get("kind") == "eval" and (task is None or r.get("task") == task)]
    kind = "best" if any(r.get("prompt") == "best" for r in ev) else "seed"
    return sorted((r for r in ev if r.get("prompt", "seed") == kind), key=lambda r: r["step"])


@dataclass
class RunCurves:
    """One run folder's rows, as the figures read them."""
    folder: Path
    rows: list[dict]     # every metrics.jsonl row
    train: list[dict]    # its train rows
    curve: list[dict]    # validation of the deployed policy on the first task (val_curve); [] if none


def compare(runs: list[Path], out_dir: Path) -> list[str]:
    """Write PNG plots for `runs` into out_dir; return the lines printed (notes and steps-to-reach)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = {}  # label (the folder name, made unique) -> (run folder, metrics rows)
    for i, run in enumerate(map(Path, runs)):
        loaded[run.name if run.name not in loaded else f"{run.name} ({i})"] = (run, read_metrics(run))
    task0 = next((r.get("task") for _, rows in loaded.values() for r in rows if r.get("kind") == "eval"), None)
    data = {lab: RunCurves(run, rows, [r for r in rows if r.get("kind", "train") == "train"], val_curve(rows, task0))
            for lab, (run, rows) in loaded.items()}
    notes = [f"{lab}: no eval rows, plotting training reward instead" for lab, d in data.items() if not d.curve]

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        _pyplot().close(fig)
        notes.append(f"wrote {out_dir / name}")

    save(plot_validation(data, task0), "val_accuracy.png")
    save(plot_kl_vs_reward(data), "kl_vs_reward.png")
    for kind, plot in (("continual", plot_continual), ("lineage", plot_lineage)):
        for lab, d in data.items():
            if (fig := plot(lab, d)) is not None:
                save(fig, f"{kind}_{d.folder.name}.png")
    return notes + steps_to_reach_notes(data)


def _pyplot():
    import matplotlib  # here, not at the top: only the plots need it, and it is slow to import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_validation(data: dict[str, RunCurves], task0):
    """Validation accuracy against steps, RL samples, and all samples (RL + fast); a run without eval rows
    shows its training reward, dotted; dashed: the seed prompt's accuracy with the same weights."""
    xs = [("step", "step"), ("rollouts_rl", "RL samples"), ("rollouts_all", "all samples (RL + fast)")]
    fig, axes = _pyplot().subplots(1, 3, figsize=(15, 4))
    for lab, d in data.items():
        rows = d.curve or d.train
        y = [r["mean_at_k"] if d.curve else r.get("reward_mean", float("nan")) for r in rows]
        seed_rows = [r for r in d.rows if r.get("kind") == "eval" and r.get("task") == task0
                     and r.get("prompt") == "seed"] if d.curve and d.curve[0].get("prompt") == "best" else []
        for ax, (key, xlabel) in zip(axes, xs):
            x_of = lambda rs: [r.get("rollouts_rl", 0) + r.get("rollouts_fast", 0) if key == "rollouts_all"  # noqa: E731
                               else r.get(key) for r in rs]
            line, = ax.plot(x_of(rows), y, marker="o" if d.curve else None, ms=3,
                            label=lab if d.curve else f"{lab} (train reward)", ls="-" if d.curve else ":")
            if seed_rows:
                ax.plot(x_of(seed_rows), [r["mean_at_k"] for r in seed_rows], ls="--", lw=1,
                        color=line.get_color(), label=f"{lab} (seed prompt)")
            ax.set_xlabel(xlabel)
    axes[0].set_ylabel(f"validation mean@k{f' ({task0})' if task0 else ''}")
    axes[0].legend(fontsize=8)
    return fig


def plot_kl_vs_reward(data: dict[str, RunCurves]):
    """Drift against reward (training rows), one colour per run."""
    fig, ax = _pyplot().subplots(figsize=(5, 4))
    for lab, d in data.items():
        pts = [(r["reward_mean"], r["kl_to_base"]) for r in d.train if "kl_to_base" in r and "reward_mean" in r]
        if pts:
            ax.scatter(*zip(*pts), s=8, alpha=0.6, label=lab)
    ax.set_xlabel("training reward (mean)")
    ax.set_ylabel("KL(trained || base) per token")
    ax.legend(fontsize=8)
    return fig


def plot_continual(lab: str, d: RunCurves):
    """A continual run's per-task curves with its stage boundaries; None for a one-task run."""
    tasks = [r.get("task") for r in d.train]
    stages = [(r["step"], t) for r, t, before in zip(d.train, tasks, [None] + tasks) if t != before]  # (step, task)
    if len(stages) < 2:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for name in dict.fromkeys(t for _, t in stages):
        c = val_curve(d.rows, name)
        if c:
            ax.plot([r["step"] for r in c], [r["mean_at_k"] for r in c], marker="o", ms=3, label=name)
        else:
            pts = [r for r in d.train if r.get("task") == name]
            ax.plot([r["step"] for r in pts], [r["reward_mean"] for r in pts], ls=":", label=f"{name} (train reward)")
    for i, (step, name) in enumerate(stages):
        if i:
            ax.axvline(step - 0.5, color="grey", ls="--", lw=1)
        ax.text(step, ax.get_ylim()[1], f" {name}", va="top", fontsize=8, color="grey")
    ax.set_xlabel("step")
    ax.set_ylabel("validation mean@k")
    ax.set_title(f"{lab}: continual, per task")
    ax.legend(fontsize=8)
    return fig


def plot_lineage(lab: str, d: RunCurves):
    """The prompt lineage of an fst/gepa run from its last saved pool: x = born step, y = mean anchor
    score, lines from parents, stars in the top K; None without a saved pool."""
    pool_files = sorted(d.folder.glob("checkpoints/step_*[0-9]/pool.json"))
    if not pool_files:
        return None
    pool_file = pool_files[-1]
    prompts = {p["id"]: p for p in json.loads(pool_file.read_text())["prompts"]}
    score = {i: sum(p["scores"].values()) / len(p["scores"]) if p["scores"] else 0.0 for i, p in prompts.items()}
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for i, p in prompts.items():
        if p.get("parent_id") in prompts:
            q = prompts[p["parent_id"]]
            ax.plot([q["born_step"], p["born_step"]], [score[q["id"]], score[i]], color="grey", lw=1)
    for top in (False, True):
        pts = [i for i, p in prompts.items() if bool(p.get("in_top_k")) == top]
        ax.scatter([prompts[i]["born_step"] for i in pts], [score[i] for i in pts], zorder=3,
                   marker="*" if top else "o", s=90 if top else 30, label="in top-K" if top else "pool")
    for i, p in prompts.items():
        ax.annotate(f"{i} {p.get('operator', '')}", (p["born_step"], score[i]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("born at step")
    ax.set_ylabel("mean score on the last anchor set")
    ax.set_title(f"{lab}: prompt lineage ({pool_file.parent.name})")
    ax.legend(fontsize=8)
    return fig


def steps_to_reach_notes(data: dict[str, RunCurves]) -> list[str]:
    """The steps each run needs to reach the first run's best validation accuracy."""
    first = next(iter(data))
    if not data[first].curve:
        return [f"steps-to-reach skipped: {first} has no eval rows"]
    target = max(r["mean_at_k"] for r in data[first].curve)
    notes = [f"target: {first}'s best validation mean@k = {target:.3f}"]
    for lab, d in data.items():
        step = next((r["step"] for r in d.curve if r["mean_at_k"] >= target), None)
        notes.append(f"  {lab}: " + ("no eval rows" if not d.curve else "never" if step is None else f"step {step}"))
    return notes


# ---------------------------------------------------------------------------------- deployable export
def with_default_system_prompt(chat_template: str, prompt: str, turns: list[dict] = ()) -> str:
    """The chat template, preceded by a statement that inserts `prompt` as the system message and `turns`
    (worked examples) after it when a conversation has no system message of its own. Before the model's
    own logic runs, so its default system message (SmolLM2's, Qwen2.5's) never fires. The prompt goes in
    as a JSON string literal: Jinja reads it the same way, and nothing inside it (%}, {{, quotes) ends it."""
    literal = json.dumps([{"role": "system", "content": prompt}, *turns], ensure_ascii=False)
    return ("{%- if not messages or messages[0]['role'] != 'system' %}"
            "{%- set messages = " + literal + " + messages %}"
            "{%- endif %}" + chat_template)


def final_validation(run: Path, upto_step: int) -> list[dict]:
    """The eval rows of the last validation at or before `upto_step` updates (all tasks and prompts)."""
    rows = [r for r in read_metrics(run) if r.get("kind") == "eval" and r["step"] <= upto_step]
    last = max((r["step"] for r in rows), default=None)
    return [r for r in rows if r["step"] == last]


def _model_card(cfg, *, run: Path, ckpt: Path, base: str, merge: bool, dtype: str, prompt: str,
                validation: list[dict], notes: list[str]) -> str:
    steps = int(ckpt.name.split("_")[-1]) + 1
    tasks = ", ".join(f"{s.name} ({s.steps} steps)" for s in cfg.schedule) or cfg.task.name
    name = cfg.model.name
    hub_id = name not in models.MODEL_ALIASES and not Path(name).exists() and not name.endswith(".gguf")
    what = (f"merged weights ({dtype}: the base with the LoRA adapter added in, no peft needed)" if merge
            else "a LoRA adapter (peft format) for the base below")
    lines = ["---", *([f"base_model: {name}"] if hub_id else []),
             f"library_name: {'transformers' if merge else 'peft'}", "tags: [fst, fast-slow-training, lora, rl]",
             "---", "", f"# {run.name} @ {ckpt.name}", "",
             f"Trained with fst (Fast-Slow Training: LoRA RL + an evolved system prompt). This folder holds {what}, "
             "the tokenizer, and a chat template whose default system message is the run's best prompt.", "",
             "| | |", "|---|---|",
             f"| base model | `{name}` (quantisation during training: {cfg.model.quant}) |",
             f"| task | {tasks} |", f"| mode | {cfg.mode} |",
             f"| steps | {steps} (checkpoint `{ckpt.name}`) |",
             f"| LoRA | r={cfg.model.lora_r}, alpha={cfg.model.lora_alpha}, targets {cfg.model.lora_targets} |",
             f"| loss | {cfg.train.loss}, lr {cfg.train.lr}, kl_coef {cfg.train.kl_coef} |", ""]
    if name in models.MODEL_ALIASES:
        package, filename = models.MODEL_ALIASES[name]
        lines += [f"`{name}` is fst's alias for `{filename}` from the `{package}` package, dequantised into "
                  f"`{base}`: not the same weights as the full-precision original on the hub.", ""]
    if not merge:
        lines += [f"`adapter_config.json` points to the base `{base}`"
                  + (" (a folder on the machine that trained it: copy it along, or edit the path)."
                     if Path(base).exists() else "."), ""]
    if merge and dtype != "float32":
        notes = [*notes, f"> Saved in {dtype}: part of a small LoRA update rounds away at this precision "
                         "(`--dtype float32` keeps all of it)."]
    lines += [*notes, *([""] if notes else []), "## Validation (from metrics.jsonl)", ""]
    if validation:
        lines += [f"After {validation[0]['step']} training steps, k={validation[0]['k']} samples per problem:", "",
                  "| task | prompt | mean@k | pass@k | problems |", "|---|---|---|---|---|"]
        lines += [f"| {r['task']} | {r.get('prompt', 'seed')} | {r['mean_at_k']:.3f} | {r['pass_at_k']:.3f} | {r['n']} |"
                  for r in validation]
    else:
        lines.append(f"This run logged no validation (eval.every was 0); measure it with `python eval.py {run}`.")
    load = ["from transformers import AutoModelForCausalLM, AutoTokenizer",
            'tok = AutoTokenizer.from_pretrained("THIS_FOLDER")',
            'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")'
            + ("" if merge else "   # with peft installed: loads the base, then the adapter"),
            'inputs = tok.apply_chat_template([{"role": "user", "content": "..."}], add_generation_prompt=True,',
            '                                 return_tensors="pt", return_dict=True)',
            'out = model.generate(**inputs, max_new_tokens=512)',
            'print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
    lines += ["", "## Load it", "", "```python", *load, "```", "",
              "A conversation without a system message gets the run's best context: its instruction as the "
              "system message (`system_prompt.txt`, also below) and its worked examples as earlier turns "
              "(`context.json`); give a system message of your own to override both.", "",
              "vLLM (not covered by fst's tests): " + (
                  "`vllm serve THIS_FOLDER`." if merge else
                  f"`vllm serve {base} --enable-lora --lora-modules fst=THIS_FOLDER "
                  "--chat-template THIS_FOLDER/chat_template.jinja`, then ask for model `fst`."), "",
              "## The best prompt", "", "```", prompt, "```", ""]
    return "\n".join(lines)


def _tokenizer_with_default_prompt(base: str, context: pool.Context):
    """The base's tokenizer, its chat template changed so that `context` is the default start of a chat.
    Checked before anything is written: user-only chats render exactly as fst prompted the model, and a
    caller's own system message still wins."""
    tok = models.load_tokenizer(base)
    if not tok.chat_template:
        raise SystemExit(f"{base}: its tokenizer has no chat template to put the best prompt in")
    original, user = tok.chat_template, [{"role": "user", "content": "2 + 3?"}]
    start = context.messages(rewards.Task(), {"question": ""})[:-1]  # system message and demo turns
    prompt = start[0]["content"]
    tok.chat_template = with_default_system_prompt(original, prompt, start[1:])
    render = lambda messages, template: tok.apply_chat_template(  # noqa: E731
        messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    own = [{"role": "system", "content": "Mine."}] + user
    why = ""
    try:
        same = (render(user, None) == render(start + user, original)
                and render(own, None) == render(own, original))
    except Exception as e:  # e.g. a template that raises "System role not supported"
        same, why = False, f" ({type(e).__name__}: {e})"
    if not same:
        raise SystemExit(f"{base}: its chat template does not take a system message the usual way"
                         f"{why}; cannot make the best prompt its default")
    return tok


def _write_weights(cfg, ckpt: Path, base: str, tmp: Path, *, merge: bool, dtype: str,
                   notes: list[str]) -> None:
    """The checkpoint's weights into `tmp`: the base with the adapter merged in (`dtype`), or the
    adapter itself pointing at `base`. Adds to `notes` what a reader of the model card must know."""
    if merge:
        # Merged in float32 on the CPU: adding a small LoRA delta to bf16 weights would round most
        # of it away, and a 7B model in float32 needs 28 GB, more than many GPUs hold.
        quantised = cfg.model.quant != "none"
        spec = dataclasses.replace(cfg.model, dtype=cfg.model.dtype if quantised else "float32", attn="sdpa",
                                   gradient_checkpointing=False)
        model, _ = models.load_model(spec, torch.device("cpu"), adapter_path=str(ckpt))
        if quantised:
            from peft import PeftModel
            base_model = model.unload().dequantize().float()
            model = PeftModel.from_pretrained(base_model, str(ckpt))
            notes.append(f"> The base was {cfg.model.quant} during training. These weights are that base "
                         f"dequantised (the values the run trained on) plus the adapter: the trained policy "
                         f"itself, not the original full-precision base plus the adapter.")
        merged = model.merge_and_unload().to(getattr(torch, dtype))
        merged.save_pretrained(tmp)
    else:
        from safetensors.torch import load_file
        load_file(ckpt / "adapter_model.safetensors")  # fails loudly on a damaged file
        shutil.copy2(ckpt / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
        adapter_config = json.loads((ckpt / "adapter_config.json").read_text())
        adapter_config.update(base_model_name_or_path=base, inference_mode=True)
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        if cfg.model.quant != "none":
            notes.append(f"> The base was {cfg.model.quant} during training; loaded as it is here, the "
                         f"adapter runs on the full-precision base, a slightly different model from the "
                         f"one measured. `--merge` gives the trained policy exactly.")


def export(run: Path, out: Path, *, step: int | None = None, merge: bool = False, dtype: str = "float32",
           overrides=()) -> list[str]:
    """Write a folder that plain transformers loads with no fst code: the checkpoint's LoRA adapter (peft)
    or, with merge, the base with the adapter merged in (`dtype` weights; a quantised base is merged
    DEQUANTISED, so the result is the trained policy exactly); the tokenizer with a chat template whose
    default system message is the run's best prompt; system_prompt.txt; README.md. Returns the lines printed."""
    cfg = fst.load_config(str(run / "config.yaml"), list(overrides))
    ckpt = checkpoints.find_checkpoint(run, step)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} exists and is not empty; give a new folder")
    base = models.resolve_model_path(cfg.model.name)
    if Path(base).exists():
        base = str(Path(base).resolve())
    notes, context = [], pool.best_context(ckpt)  # the best instruction and its worked examples
    if context is None:  # the seed prompt, chosen as fst.train chooses it
        task = make_task(cfg.task.name, cfg)
        context = pool.Context(rewards.seed_prompt(task, cfg.task.system_prompt, continual=bool(cfg.schedule)))
        notes.append(f"> {ckpt / 'pool.json'} is missing: the default system message is the run's seed prompt.")
    prompt = context.instruction if context.demo_format == "turns" else context.text()  # the system message

    tok = _tokenizer_with_default_prompt(base, context)   # first: its template is checked before any writing

    tmp = out.with_name(out.name + ".tmp")  # written whole, then renamed: never half an export
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _write_weights(cfg, ckpt, base, tmp, merge=merge, dtype=dtype, notes=notes)
    tok.save_pretrained(tmp)
    (tmp / "system_prompt.txt").write_text(prompt)
    (tmp / "context.json").write_text(json.dumps(dataclasses.asdict(context), indent=1))  # + the demo turns
    (tmp / "README.md").write_text(_model_card(
        cfg, run=run, ckpt=ckpt, base=base, merge=merge, dtype=dtype, prompt=prompt,
        validation=final_validation(run, int(ckpt.name.split("_")[-1]) + 1), notes=notes))
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
    kind = f"merged {dtype} weights" if merge else f"LoRA adapter on {base}"
    return [f"[export] {run} @ {ckpt.name} -> {out}: {kind}, tokenizer, chat template with the best "
            f"prompt as default system message, system_prompt.txt, README.md",
            *(n.lstrip("> ") for n in notes)]


# ---------------------------------------------------------------------------------- command line
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        ap = argparse.ArgumentParser(prog="eval.py export",
                                     description="a folder plain transformers / vLLM load: adapter or merged "
                                                 "weights, tokenizer, best prompt as default system message")
        ap.add_argument("run", type=Path)
        ap.add_argument("--out", type=Path, required=True, help="a new (or empty) folder")
        ap.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
        ap.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
        ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the merged weights (default float32: bf16 rounds small LoRA deltas away)")
        ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set model.name=/path/to/base")
        args = ap.parse_args(argv[1:])
        try:
            lines = export(args.run, args.out, step=args.step, merge=args.merge, dtype=args.dtype,
                           overrides=args.set)
        except config.ConfigError as e:
            raise SystemExit(f"config error: {e}")
        print("\n".join(lines))
        return
    if argv[:1] == ["compare"]:
        ap = argparse.ArgumentParser(prog="eval.py compare", description="plots across run folders")
        ap.add_argument("runs", nargs="+", type=Path)
        ap.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
        args = ap.parse_args(argv[1:])
        print("\n".join(compare(args.runs, args.out)))
        return
    ap = argparse.ArgumentParser(description="measure one checkpoint of a run folder")
    ap.add_argument("run", type=Path)
    ap.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ap.add_argument("--tasks", nargs="+", help="tasks to measure (default: the tasks the run trained on)")
    ap.add_argument("--forgetting", nargs="*", help="other tasks for forgetting (default: "
                    f"{' '.join(FORGETTING_TASKS)}, less the run's own; none: no forgetting)")
    ap.add_argument("--problems", "--n", dest="n", type=int,  # --problems: torchrun reads --n as its own
                    help="test problems per task (default: config eval.n)")
    ap.add_argument("--k", type=int, help="samples per problem (default: config eval.k)")
    ap.add_argument("--max-new-tokens", type=int, help="default: config sampling.max_new_tokens")
    ap.add_argument("--batch-size", type=int, help="prompts prefilled together (memory knob)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set device=cpu --set model.quant=none")
    args = ap.parse_args(argv)
    dist = torchrun.init_distributed()  # under torchrun: every measurement split over the ranks
    try:
        out = report(args.run, step=args.step, tasks=args.tasks, forgetting=args.forgetting, n=args.n, k=args.k,
                     max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                     overrides=args.set, dist=dist)
    except config.ConfigError as e:  # a bad --set or a folder that is not a run: one line, like fst.py
        raise SystemExit(f"config error: {e}")
    finally:
        dist.close()
    if dist.is_main:
        print(markdown(out))
        print(f"[eval] wrote {out['json_path']}", file=sys.stderr)


if __name__ == "__main__":
    main()

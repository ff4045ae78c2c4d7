"""Markdown report (results/REPORT.md) and the README table snippet, from results.json."""
from __future__ import annotations

import math
from typing import Any, Dict, List

NAMES = {"arcface": "ArcFace", "cosface": "CosFace", "otface": "OTFace", "adaface": "AdaFace",
         "curricularface": "CurricularFace", "elasticface_arc": "ElasticFace-Arc", "elasticface_cos": "ElasticFace-Cos"}
METRICS = [("accuracy", "accuracy (k-fold)"), ("tar@far=0.01", "TAR@FAR=1e-2"),
           ("tar@far=0.001", "TAR@FAR=1e-3"), ("hard_accuracy_other_seed", "hard pairs (other-seed ArcFace)"),
           ("hard_accuracy_same_seed", "hard pairs (same-seed ArcFace)")]


def is_main(run: Dict[str, Any]) -> bool:
    """A run of the loss tables: not an ablation or sampler-comparison run."""
    return run["main"]


def sampler_of(meta: Dict[str, Any]) -> str:
    """The main runs' sampler."""
    return meta["sampler"]


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def pm(s: Dict[str, float], scale: float = 100.0, digits: int = 2) -> str:
    if s["n"] > 1:
        return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"
    return f"{scale * s['mean']:.{digits}f}"


def main_table(res: Dict[str, Any]) -> List[str]:
    cols = [m for m in METRICS if any(m[0] in res["summary"][l] for l in res["summary"])]
    head = "| loss | " + " | ".join(c[1] + " %" for c in cols) + " | ms/step (median) |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for loss, s in res["summary"].items():
        cells = [pm(s[m]) if m in s else "–" for m, _ in cols]
        t = s.get("ms_per_step_median")
        lines.append(f"| {NAMES.get(loss, loss)} | " + " | ".join(cells) + f" | {pm(t, 1.0, 0) if t else '–'} |")
    return lines


# Two-sided 5% critical values of Student's t by degrees of freedom (n seeds - 1).
T_CRIT = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def verdict(d: Dict[str, Any], baseline: str = "ArcFace") -> str:
    """Plain words for a paired difference (per-seed run - baseline run): a paired t-test at 5%."""
    if d["n"] < 2:
        return "one seed only: no spread, no conclusion"
    crit = T_CRIT.get(d["n"] - 1, 2.0)
    se = d["std"] / math.sqrt(d["n"])
    if se == 0:
        return "identical on every seed" if d["mean"] == 0 else "same difference on every seed"
    t = d["mean"] / se
    if abs(t) < crit:
        return f"within seed noise (paired t = {t:.1f}, 5% threshold {crit})"
    return ("better" if d["mean"] > 0 else "worse") + f" than {baseline} (paired t = {t:.1f} > {crit}, n = {d['n']})"


def cost_line(res: Dict[str, Any]) -> List[str]:
    """OTFace's step time relative to ArcFace's."""
    s = res["summary"]
    try:
        ratio = s["otface"]["ms_per_step_median"]["mean"] / s["arcface"]["ms_per_step_median"]["mean"]
    except KeyError:
        return []
    return [f"Cost: an OTFace step takes {ratio:.2f}x the time of an ArcFace step here (mining, the "
            "batched Sinkhorn solve on the hard triplets' 7x7 maps, and its backward).", ""]


def ot_activity_lines(res: Dict[str, Any]) -> List[str]:
    """How long the OT term acted, per default run and per ablation variant."""
    act = res.get("ot_activity") or {}
    if not act:
        return []
    steps = res["meta"]["train"]["steps"]
    default = {n: a for n, a in act.items() if is_main(res["runs"][n])}
    if not default:
        return []
    share = sum(a["active_share"] for a in default.values()) / len(default)
    thirds = [sum(a["active_share_by_third"][i] for a in default.values()) / len(default) for i in range(3)]
    lines = [f"**When the OT term acted.** With the default `triplet_mode=hard`, {100 * share:.0f}% of the logged "
             f"OTFace steps had any hard triplet (mean over seeds; first / middle / last third of the {steps} steps: "
             f"{' / '.join(f'{100 * t:.0f}%' for t in thirds)}). "
             + ("In the other steps every anchor's hardest positive "
                "beats its hardest negative by the triplet margin in the training batch, the OT term is exactly 0 "
                "and the update is plain ArcFace's: OTFace differs from ArcFace only "
                "in the steps with hard triplets; see the hard-triplet panel of the training plot." if share < 1 else
                "The OT term acted in every logged step, all through training; the table says how many of the "
                f"{meta_batch(res)} anchors per step were hard and how large L_OT stayed."),
             "", *ot_thirds_table(default)]
    if thirds[2] == 0:
        lines += ["", "**The OT term went idle:** no logged step of the last third had a hard triplet, so OTFace "
                  "trained as ArcFace there. Other hard-group rules the abstract's triplet scheme allows can be "
                  "run one at a time with `--ablation triplets=all,triplets=misclassified`."]
    abl = {n: a for n, a in act.items() if res["runs"][n]["variant"] != "default"}
    if abl:
        lines += ["", "Per ablation run: " + ", ".join(
            f"`{res['runs'][n]['variant']}` {100 * a['active_share']:.0f}%" for n, a in abl.items()) + " of logged steps with triplets."]
    return lines + [""]


def meta_batch(res: Dict[str, Any]) -> int:
    tc = res["meta"]["train"]
    return tc["P"] * tc["K"]


def ot_thirds_table(act: Dict[str, Dict[str, Any]]) -> List[str]:
    """Per third of training (mean over the given runs): steps with hard triplets, hard triplets per
    step, and the OT term (before lambda) — whether the term still acts late in training."""
    if not all("mean_ot_by_third" in a for a in act.values()):
        return []
    n = len(act)
    cols = [("steps with hard triplets", "active_share_by_third", lambda v: f"{100 * v:.0f}%"),
            ("hard triplets per step", "mean_triplets_by_third", lambda v: f"{v:.2f}"),
            ("mean OT term L_OT", "mean_ot_by_third", lambda v: f"{v:.4f}")]
    # a column only where every run measured it in every third (the share is NaN where it was not
    # measured, e.g. measure_grad_share=False): a gap would otherwise read as a value
    optional = [("lambda", "mean_lambda_by_third", lambda v: f"{v:.3g}"),
                ("OT share of the gradient at F", "mean_grad_share_by_third", lambda v: f"{100 * v:.1f}%"),
                ("cosine(OT, margin) at F", "mean_grad_cos_by_third", lambda v: f"{v:+.2f}")]
    cols += [c for c in optional if all(None not in (a.get(c[1]) or [None]) for a in act.values())]
    lines = ["| third of training | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for i, name in enumerate(("first", "middle", "last")):
        cells = [fmt(sum(a[key][i] for a in act.values()) / n) for _, key, fmt in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def paired_lines(res: Dict[str, Any]) -> List[str]:
    lines = ["| comparison | metric | mean difference (points) | std over seeds | better on seeds | reading |",
             "|---|---|---|---|---|---|"]
    for comp, per in res["paired"].items():
        a, _ = comp.split("-")
        for m, label in METRICS:
            if m in per:
                d = per[m]
                lines.append(f"| {NAMES.get(a, a)} − ArcFace | {label} | {100 * d['mean']:+.2f} | "
                             f"{100 * d['std']:.2f} | {d['wins']}/{d['n']} | {verdict(d)} |")
    return lines


def per_seed_lines(res: Dict[str, Any]) -> List[str]:
    lines = ["| run | accuracy % | TAR@1e-2 % | TAR@1e-3 % | hard (other-seed) % | hard (same-seed) % | final loss | ms/step |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        if r["variant"] != "default":
            continue
        lines.append(f"| {name} | {pct(r['accuracy'])} | {pct(r['tar@far=0.01'])} | {pct(r['tar@far=0.001'])} | "
                     f"{pct(r['hard_accuracy_other_seed']) if 'hard_accuracy_other_seed' in r else '–'} | "
                     f"{pct(r['hard_accuracy_same_seed']) if 'hard_accuracy_same_seed' in r else '–'} | "
                     f"{r['final_loss']:.3f} | {r['ms_per_step_median']:.0f} |")
    return lines


def sampler_section(res: Dict[str, Any]) -> List[str]:
    """The sampler comparison: the same losses and seeds trained with the other batch plan."""
    comp = res.get("sampler_comparison") or {}
    if not comp:
        return []
    lines = ["### Sampler comparison (same seeds, same initial weights, other batch plan)", "",
             "| loss | sampler | accuracy % | TAR@FAR=1e-2 % | TAR@FAR=1e-3 % | ms/step (median) |",
             "|---|---|---|---|---|---|"]
    for loss, c in comp.items():
        for sampler, s in ((c["baseline"], res["summary"][loss]), (c["sampler"], c["summary"])):
            lines.append(f"| {NAMES.get(loss, loss)} | {sampler} | {pm(s['accuracy'])} | {pm(s['tar@far=0.01'])} | "
                         f"{pm(s['tar@far=0.001'])} | {pm(s['ms_per_step_median'], 1.0, 0)} |")
    lines += ["", "| comparison | metric | mean difference (points) | std over seeds | better on seeds | reading |",
              "|---|---|---|---|---|---|"]
    for loss, c in comp.items():
        base = f"{NAMES.get(loss, loss)} {c['baseline']}"
        for m, label in METRICS:
            if m in c["paired"]:
                d = c["paired"][m]
                lines.append(f"| {NAMES.get(loss, loss)} {c['sampler']} − {c['baseline']} | {label} | "
                             f"{100 * d['mean']:+.2f} | {100 * d['std']:.2f} | {d['wins']}/{d['n']} | "
                             f"{verdict(d, base)} |")
    act = res.get("ot_activity") or {}
    for loss, c in comp.items():
        other = {n: act[n] for n in c["runs"] if n in act}
        if other:
            lines += ["", f"When the OT term acted with `sampler: {c['sampler']}` (mean over its {len(other)} "
                      f"{NAMES.get(loss, loss)} runs; the table above the per-run list is `sampler: {c['baseline']}`):",
                      "", *ot_thirds_table(other)]
    return lines + [""]


def paired_variants_section(res: Dict[str, Any]) -> List[str]:
    """Ablation variants run at several seeds: each paired by seed with ArcFace and with the
    default OTFace, and how each one's OT term acted per third of training."""
    abl = res["ablation"]
    seeds = res["meta"]["seeds"][:res["meta"]["ablation_seeds"]]
    lines = [f"Seeds {', '.join(map(str, seeds))}: each variant changes one OTFace option against the defaults "
             "(`lambda_ot=0.1, eps=0.05, feature=conv, triplet_mode=hard`), on the same data, steps, initial "
             "weights and batches as the main runs of that seed; differences are paired by seed.", "",
             "| variant | options | accuracy % | TAR@FAR=1e-3 % | − ArcFace, accuracy (points) | reading | "
             "− default OTFace, accuracy (points) | reading |", "|---|---|---|---|---|---|---|---|"]
    for v, a in abl.items():
        opts = ", ".join(f"{k}={val}" for k, val in a["options"].items())
        cells = []
        for key, base in (("paired_vs_arcface", "ArcFace"), ("paired_vs_default", "default OTFace")):
            d = (a.get(key) or {}).get("accuracy")
            if d is None or (v == "default" and key == "paired_vs_default"):
                cells += ["–", "–"]
            else:
                cells += [f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f} ({d['wins']}/{d['n']} better)", verdict(d, base)]
        s = a["summary"]
        lines.append(f"| {v} | {opts} | {pm(s['accuracy'])} | {pm(s['tar@far=0.001'])} | " + " | ".join(cells) + " |")
    act = res.get("ot_activity") or {}
    for v, a in abl.items():
        runs = {n: act[n] for n in a["runs"] if n in act}
        if runs:
            lines += ["", f"`{v}`: the OT term per third of training (mean over its {len(runs)} runs):", "",
                      *ot_thirds_table(runs)]
    return lines + [""]


def ablation_section(res: Dict[str, Any]) -> List[str]:
    abl = res.get("ablation") or {}
    if not abl:
        return ["The ablation was not run (`--no-ablation`)."]
    if res["meta"].get("ablation_seeds", 1) > 1:
        return paired_variants_section(res)
    runs = res["runs"]
    base = runs[abl["default"]["run"]]
    noise = res["summary"].get("otface", {}).get("accuracy", {"std": 0.0, "n": 1})
    lines = [f"One seed ({base['seed']}), one option changed at a time against the defaults "
             f"(`lambda_ot=0.1, eps=0.05, feature=conv, triplet_mode=hard`); same data, steps and batches.", "",
             "| variant | options | accuracy % | Δ vs default (points) | TAR@1e-2 % | TAR@1e-3 % | hard (other-seed) % | ms/step |",
             "|---|---|---|---|---|---|---|---|"]
    deltas = {}
    for v, a in abl.items():
        r = runs[a["run"]]
        deltas[v] = r["accuracy"] - base["accuracy"]
        opts = ", ".join(f"{k}={val}" for k, val in a["options"].items())
        hard = pct(r["hard_accuracy_other_seed"]) if "hard_accuracy_other_seed" in r else "–"
        lines.append(f"| {v} | {opts} | {pct(r['accuracy'])} | {100 * deltas[v]:+.2f} | {pct(r['tar@far=0.01'])} | "
                     f"{pct(r['tar@far=0.001'])} | {hard} | {r['ms_per_step_median']:.0f} |")
    lines.append("")
    if noise["n"] > 1:
        sigma = noise["std"]
        lines.append(f"Noise reference: the default OTFace's accuracy varies by **{100 * sigma:.2f} points (std)** "
                     f"across {noise['n']} seeds. A single-seed difference smaller than about twice that "
                     f"({200 * sigma:.2f} points) is not evidence.")
        beyond = [v for v, d in deltas.items() if v != "default" and abs(d) > 2 * sigma]
        if not beyond:
            lines.append("\n**Reading:** no variant moves accuracy by more than twice the seed noise: this data "
                         "and budget cannot distinguish the options, so the defaults are kept as "
                         "chosen by design (they are not contradicted, and not confirmed, by this ablation).")
        else:
            lines.append("\n**Reading:** variants beyond twice the seed noise (one seed each, so indicative, "
                         "not conclusive): " + ", ".join(f"`{v}` ({100 * deltas[v]:+.2f})" for v in beyond)
                         + ". Everything else is within noise.")
    else:
        lines.append("Only one seed was run, so there is no noise reference: the differences above are not evidence.")
    return lines


def recipe_rows(meta: Dict[str, Any]) -> List[str]:
    """Backbone and training rows of a report made through the recipe route."""
    tc = meta["train"]
    return [
        f"| backbone | upstream `{meta.get('network', 'mbf')}` (`backbones.get_model`), "
        f"{tc['embedding_size']}-d embedding, seeded by the job's `seed` |",
        f"| training | `torchrun --nproc_per_node=1 train_v2.py` per run, {tc['steps']} steps, P x K = "
        f"{tc['P']} x {tc['K']} (`sampler: {sampler_of(meta)}` for every loss), SGD lr {tc['lr']} momentum {tc['momentum']} "
        f"wd {tc['weight_decay']}, PolyScheduler, scale s = 64 (fixed in train_v2.py) |",
    ]


PK_BATCHES = "`PKSampler` (same order for every loss of a seed)"
HARD_BATCHES = "`HardPKSampler` (groups of neighbouring identities by each run's class centres)"


def dataset_name(meta: Dict[str, Any]) -> str:
    """The short dataset name of a report."""
    return meta["dataset_info"]["name"]


def data_row(meta: Dict[str, Any]) -> str:
    """The report's data row: what the dataset given is, and how much of it was used."""
    info = meta["dataset_info"]
    lo, med, hi = info["images_per_identity"]
    return (f"| data | {info['description']} (`{info['path']}`): {info['identities']} identities used, "
            f"{info['images']} images, {lo}–{hi} per identity (median {med:g}) |")


def is_recipe(meta: Dict[str, Any]) -> bool:
    return meta.get("route", "").startswith("recipe")


def header_lines(res: Dict[str, Any], command: str) -> List[str]:
    meta = res["meta"]
    toy = ("\n> **TOY RUN** (`--toy`): a pipeline check on a few identities with a tiny net and a few "
           "dozen steps. These numbers say nothing about the losses.\n" if meta["toy"] else "")
    return [
        f"# Evidence: {' vs '.join(NAMES.get(loss, loss) for loss in meta['losses'])} on {dataset_name(meta)}",
        "",
        f"Generated by `{command}` ({meta['finished_utc']} UTC; torch {meta['torch']}, {meta['cpus']} CPUs, "
        f"{meta['jobs']} run(s) in parallel). All numbers are in `results.json`; this file is rewritten by every run of the command.",
        toy,
    ]


def plugin_rows(meta: Dict[str, Any]) -> List[str]:
    """Backbone and training rows of a report made through the plugin route."""
    tc = meta["train"]
    return [
        f"| backbone | small iresnet-like net (`otface_plugin.bench.model.BenchNet`, widths {tuple(tc['widths'])}, "
        f"`layer4` 7x7 map, {tc['embedding_size']}-d embedding), same initial weights for every loss of a seed |",
        f"| training | {tc['steps']} steps, P x K = {tc['P']} x {tc['K']} batches from the plugin's "
        f"{HARD_BATCHES if sampler_of(meta) == 'hard' else PK_BATCHES}, SGD lr {tc['lr']} momentum {tc['momentum']} wd {tc['weight_decay']}, "
        f"warm-up then poly-2 decay, scale s = {tc['scale']} |"]


def setup_lines(meta: Dict[str, Any]) -> List[str]:
    split = meta["split"]
    how_timed = (", from the time between train_v2.py's logged steps), one run at a time" if is_recipe(meta)
                 else f"), one torch thread per run, {meta['jobs']} run(s) in parallel")
    return [
        "## Setup",
        "",
        "| | |",
        "|---|---|",
        data_row(meta),
        f"| split | {split.get('description') or 'identity-disjoint, random'}: {len(split['train_identities'])} "
        f"train identities, {len(split['test_identities'])} test identities (split seed {split['split_seed']}) |",
        f"| files | `train.rec`/`.idx` (112x112 RGB JPEG) and `test.bin` ({split['pairs']} pairs, half same, "
        f"{split['folds']} identity-disjoint folds) built with `otface-data` |",
        *[f"| chosen for this dataset | {note} |" for note in split.get("notes", [])],
        *(recipe_rows(meta) if is_recipe(meta) else plugin_rows(meta)),
        f"| losses | ArcFace (m = 0.5), CosFace (m = 0.4), OTFace = ArcFace + lambda * L_OT "
        f"({', '.join(f'{k}={v}' for k, v in meta['otface_defaults'].items())}, lambda warm-up over 10% of the steps) |",
        f"| route | {meta['route']} |",
        f"| seeds | {', '.join(map(str, meta['seeds']))} |",
        f"| timing | wall time per training step (median over a run's steps, forward + loss + backward + "
        f"update{how_timed} on {meta['cpus']} CPUs; "
        "comparable between the losses of one report, not across machines |",
        f"| evaluation | {split['folds']}-fold accuracy over the pair order (threshold picked on the other folds"
        f"{'; the folds are pairs.txt folds: LFW cross-validation restricted to the test folds' if split.get('protocol') == 'lfw' else ''}), "
        f"TAR at FAR 1e-2 / 1e-3 over all pairs, flip-test embeddings (f(x) + f(flip x)) |",
        "",
    ]


def results_lines(res: Dict[str, Any]) -> List[str]:
    meta = res["meta"]
    n_seeds = len(meta["seeds"])
    hard = int(100 * meta["hard_fraction"])
    return [
        f"## Results (mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''}, in %)",
        "",
        *main_table(res),
        "",
        *cost_line(res),
        f"Hard pairs: the {hard}% lowest-similarity positive and "
        f"{hard}% highest-similarity negative pairs under an ArcFace model, "
        "scored with each model's held-out-fold predictions. *Same-seed*: the ArcFace model of the same seed "
        "selects them, so ArcFace is judged on its own worst pairs (biased against it by construction: it "
        "is near 0 for ArcFace and regression to the mean lifts every other model). *Other-seed*: the ArcFace "
        "model of the next seed selects them, so all losses of a seed are judged on pairs chosen by an "
        "independent model; use this column to compare.",
        "",
        "### Paired differences against ArcFace (same seed, same batches)",
        "",
        *(paired_lines(res) if res["paired"] else ["(no ArcFace baseline in this run)"]),
        "",
        *ot_activity_lines(res),
        *sampler_section(res),
        "### Per run",
        "",
        *per_seed_lines(res),
        "",
    ]


PLOT_LINES = [
    "## Plots",
    "",
    "Training loss and OTFace's OT components over the steps (mean ± std over seeds):",
    "",
    "![training curves](training.png)",
    "",
    "ROC curves on the held-out pairs, every seed of every loss:",
    "",
    "![ROC](roc.png)",
    "",
    "Similarity of same-identity and different-identity held-out pairs (first seed):",
    "",
    "![similarity histograms](similarity_hist.png)",
    "",
]


def limits_lines(meta: Dict[str, Any]) -> List[str]:
    tc, split = meta["train"], meta["split"]
    return [
        "## What this setup can and cannot show",
        "",
        f"- **Small data.** {len(split['train_identities'])} training identities of {dataset_name(meta)}; the paper trains on MS1M-scale data (tens of thousands of identities, "
        "millions of images) and tests on LFW/CFP/AgeDB/IJB. Nothing here predicts the gain at that scale, "
        "and the paper's numbers are not reproduced or checked.",
        f"- **CPU budget.** A small net trained for {tc['steps']} steps on 2 CPU cores, far from convergence "
        "of a real face model; the losses are compared at equal (small) compute, which is what a user "
        "trying a loss first would see, not at their best.",
        f"- **Few test pairs.** {split['pairs']} pairs from {len(split['test_identities'])} identities in "
        f"{split['folds']} folds, so fold accuracies vary; TAR@FAR=1e-3 rests on a handful of "
        f"negative pairs ({split['pairs'] // 2} negatives: 1e-3 allows {split['pairs'] // 2 // 1000} false accepts).",
        "- **Seeds.** Differences are read against the seed-to-seed spread (paired by seed, since all "
        "losses of a seed share initial weights and batches). "
        + ("The ablation uses one seed per variant, so only differences well beyond that spread would mean anything."
           if meta.get("ablation_seeds", 1) == 1 else
           f"Ablation variants run at up to {meta['ablation_seeds']} seeds, paired like the main runs; "
           "a variant run at one seed only has no spread of its own."),
        ("- **Route.** The recipe's `train_v2.py` (patched copy, one process, CPU/gloo): upstream "
         "backbone, dataloader, PolyScheduler and margin softmax (s = 64); timings include its data "
         "loading." if is_recipe(meta) else
         "- **Route.** The plugin's own loop, not the recipe's `train_v2.py` (no DDP, no PartialFC "
         "sampling, no fp16). The OTFace term and margin heads are the same modules the recipe integration "
         "uses; the recipe route is not exercised by this report (`otface-bench --route recipe` runs it)."),
        "- **What it does show:** the pipeline runs end to end on real faces with the plugin's own data "
        "tools, OTFace trains stably next to ArcFace/CosFace under identical conditions, its OT term and "
        "hard-triplet counts behave as designed, and its per-step cost relative to ArcFace.",
        "",
    ]


def reproduce_lines(command: str, runs_dir: str) -> List[str]:
    return [
        "## Reproduce",
        "",
        "    pip install -e .[bench]",
        f"    {command}",
        "",
        f"Finished runs are stored under `{runs_dir}/` and are not repeated; delete that folder "
        "(or change a setting) to retrain.",
        "",
    ]


def render(res: Dict[str, Any], command: str) -> str:
    """REPORT.md: header, setup, results, plots, ablation, limits, how to reproduce."""
    meta = res["meta"]
    return "\n".join([
        *header_lines(res, command),
        *setup_lines(meta),
        *results_lines(res),
        *PLOT_LINES,
        "## Ablation of the OTFace options",
        "",
        *ablation_section(res),
        *(["", "![ablation](ablation.png)"] if res.get("ablation") else []),
        "",
        *limits_lines(meta),
        *reproduce_lines(command, meta.get("runs_dir", "<out>/_work/runs")),
    ])


def readme_table(res: Dict[str, Any]) -> str:
    """The short table for the README (numbers from results.json)."""
    n = len(res["meta"]["seeds"])
    lines = [f"| loss ({dataset_name(res['meta'])}, {n} seed{'s' if n > 1 else ''}) | accuracy % | TAR@FAR=1e-3 % | hard pairs % | ms/step |",
             "|---|---|---|---|---|"]
    for loss, s in res["summary"].items():
        hard = s.get("hard_accuracy_other_seed") or s.get("hard_accuracy_same_seed")
        lines.append(f"| {NAMES.get(loss, loss)} | {pm(s['accuracy'])} | {pm(s['tar@far=0.001'])} | "
                     f"{pm(hard) if hard else '–'} | {pm(s['ms_per_step_median'], 1.0, 0)} |")
    return "\n".join(lines) + "\n"

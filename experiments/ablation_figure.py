"""Reproduce the paper's ablation figure: sparsifying Wasserstein neurons vs control sets.

For each MLP, the top-p% neurons of each strategy have their rows sparsified to each neuron
sparsity with the chosen method; perplexity after each setting is plotted against sparsity.
Works on the embedded model (default) and on any Hugging Face model by name or folder.

    python experiments/ablation_figure.py --out runs/ablation_figure
    python experiments/ablation_figure.py --model EleutherAI/pythia-410m-deduped --seqlen 2048 \\
        --dataset wikitext2 --out runs/pythia_ablation

Prints the summary table (mean / min / max perplexity over seeds per strategy and sparsity) and
writes ablation.csv, ablation.png and config.json to --out.
"""

from __future__ import annotations

import argparse

from wasserstein_neurons.ablation import STRATEGIES, AblationConfig, summarize
from wasserstein_neurons.workflows import AblateConfig, run_ablate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="embedded")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--top-percent", type=float, default=3.0)
    p.add_argument("--sparsities", default="0.5,0.8,0.9,0.95,0.99")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ranking", default=None, help="reuse a rank run folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/ablation_figure")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    study = AblationConfig(
        strategies=args.strategies,
        top_percent=args.top_percent,
        neuron_sparsities=[float(s) for s in args.sparsities.split(",")],
        method=args.method,
        seeds=args.seeds,
    )
    cfg = AblateConfig(
        model=args.model,
        dataset=args.dataset,
        seqlen=args.seqlen,
        eval_tokens=args.eval_tokens,
        device=args.device,
        out=args.out,
        study=study,
        ranking=args.ranking,
        nsamples=args.nsamples,
        overwrite=args.overwrite,
    )
    results = run_ablate(cfg)
    print(summarize(results).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"figure: {args.out}/ablation.png")


if __name__ == "__main__":
    main()

# Stage: a sample sheet of the final one-step generator, on request only (not part of the default
# target): `snakemake --cores all results/<run>/samples/sheet.png`. One labelled grid with a row
# per class of the run (its synset above it) and `per_class` one-step samples of
# train/stage2/net_ema.pt in the columns (remeanflow.generate.sample). Sample j of class c has the
# noise of sample id c * 1000000 + j under `seed`, so `python -m remeanflow sample` regenerates
# any of them (same batch) at full size. Latent nets decode through `evaluate.vae`.

SAMPLE_SHEET_VAE = [S.evaluate.vae] if S.evaluate.vae is not None else []


rule sample_sheet:
    input:
        net=f"{RUN}/train/stage2/net_ema.pt",
        labels=f"{RUN}/data/labels.csv",
        vae=SAMPLE_SHEET_VAE,
    output:
        f"{RUN}/samples/sheet.png",
    log:
        f"{RUN}/logs/sample_sheet.log",
    benchmark:
        f"{RUN}/benchmarks/sample_sheet.tsv"
    conda:
        "../envs/torch.yaml"
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        gpu=min(res("evaluate", "gpu"), 1),
    params:
        step=params_of("sample_sheet"),
        per_class=2,
        seed=0,
        batch=64,
    script:
        "../workflow_scripts/sample_sheet.py"

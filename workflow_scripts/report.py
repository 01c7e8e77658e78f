"""Rules report_stage (figures of one checkpoint) and report (the self-contained HTML page)."""

from pathlib import Path

from remeanflow import report
from remeanflow.workflow import step

smk = snakemake  # noqa: F821


def report_stage(s) -> dict:
    stage = smk.wildcards.stage
    return report.stage_figures(
        smk.input.train, smk.input.grid, smk.input.manifest, smk.output.training, smk.output.samples, stage=stage,
        grad_clip=s.settings.train.stage(int(stage.removeprefix("stage"))).grad_clip,
    )


def report_page(s) -> dict:
    stages = {
        stage: report.StageInputs(eval_metrics=m, train_metrics=t, samples_png=g, training_png=c)
        for stage, m, t, g, c in zip(smk.params.stages, smk.input.metrics, smk.input.train, smk.input.samples,
                                     smk.input.training, strict=True)
    }
    return report.build_report(
        smk.output.html, smk.output.teacher, smk.output.couplings, run_name=s.settings.run_name,
        teacher_metrics=next(iter(smk.input.teacher), None), manifest=smk.input.manifest, stages=stages,
        root=Path(smk.output.html).parent.parent,  # <run>/report/index.html: table paths relative to <run>
    )


with step(smk) as s:
    s.extra["report"] = {"report_stage": report_stage, "report": report_page}[smk.rule](s)

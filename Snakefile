# sharpflow: the whole study as one DAG. Rules live in workflow/rules/, one file per stage.
# Run: snakemake --cores all            (config/config.yaml, the offline CPU default)
#      snakemake --cores all --configfile config/paper.yaml --resources gpu=4

include: "workflow/rules/common.smk"


wildcard_constraints:
    run=r"[A-Za-z][A-Za-z0-9_.\-]*",
    step=r"\d{8}",
    dataset=r"[A-Za-z][A-Za-z0-9_]*",



include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        ALL_TARGETS,
    default_target: True

# sharpflow: the whole study as one DAG. Rules live in workflow/rules/, one file per stage.
# Run: snakemake --cores all            (config/config.yaml, the offline CPU default)
#      snakemake --cores all --configfile config/paper.yaml --resources gpu=4
# As a module of another workflow: see tests/test_module.py.
from snakemake.utils import min_version

min_version("9.20")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_outputs,
    default_target: True

# figure / table: one rule each, reading only the aggregated tables it shows plus its own
# plotting module, so editing one plotting module reruns only the figures of that kind.
# `snakemake --report` gathers every figure and table with its caption.

ALL_TARGETS = [path for run in RUNS for path in run_outputs(run)]

# claims: each published claim, its statistic and verdict on the runs (tables/claims.*).
if CFG.claims.enabled:

    rule claims:
        input:
            tables=claims_inputs(),
            code=[str(p) for p in claims_code_files()],
        output:
            md=f"{R}/tables/claims.md",
            tex=f"{R}/tables/claims.tex",
            csv=report(
                f"{R}/tables/claims.csv",
                caption=os.path.join(workflow.basedir, "workflow/report/claims.rst"),
                category="1. Claims",
                labels={"table": "claims", "kind": "claims"},
            ),
        params:
            spec=claims_params(),
            timing=f"{R}/benchmarks/table/claims.json",
        conda:
            ENV
        log:
            f"{R}/logs/table/claims.log",
        benchmark:
            f"{R}/benchmarks/table/claims.tsv"
        localrule: True
        shell:
            "sharpflow claims --spec {params.spec:q} --out-md {output.md:q} --out-tex {output.tex:q} "
            "--out-csv {output.csv:q} --timing {params.timing:q} {input.tables:q} 2> {log:q}"

    ALL_TARGETS += [f"{R}/tables/claims.{ext}" for ext in ("md", "tex", "csv")]


for _name, _fig in CFG.figures.items():

    rule:
        name:
            f"figure_{_name}"
        input:
            tables=presentation_inputs(_fig, sharpflow.figures),
            code=code_inputs(sharpflow.figures, _fig.kind),
        output:
            pdf=f"{R}/figures/{_name}.pdf",
            png=report(
                f"{R}/figures/{_name}.png",
                caption=caption(sharpflow.figures, _fig.kind),
                category="Figures",
                labels={"figure": _name, "kind": _fig.kind},
            ),
        params:
            spec=presentation_spec(_fig),
            kind=_fig.kind,
            timing=f"{R}/benchmarks/figure/{_name}.json",
        conda:
            ENV
        log:
            f"{R}/logs/figure/{_name}.log",
        benchmark:
            f"{R}/benchmarks/figure/{_name}.tsv"
        localrule: True
        shell:
            "sharpflow figure {params.kind} --spec {params.spec:q} --out-pdf {output.pdf:q} "
            "--out-png {output.png:q} --timing {params.timing:q} {input.tables:q} 2> {log:q}"

    ALL_TARGETS += [f"{R}/figures/{_name}.pdf", f"{R}/figures/{_name}.png"]

for _name, _tab in CFG.tables.items():

    rule:
        name:
            f"table_{_name}"
        input:
            tables=presentation_inputs(_tab, sharpflow.tables),
            code=code_inputs(sharpflow.tables, _tab.kind),
        output:
            md=f"{R}/tables/{_name}.md",
            tex=f"{R}/tables/{_name}.tex",
            csv=report(
                f"{R}/tables/{_name}.csv",
                caption=caption(sharpflow.tables, _tab.kind),
                category="Tables",
                labels={"table": _name, "kind": _tab.kind},
            ),
        params:
            spec=presentation_spec(_tab),
            kind=_tab.kind,
            timing=f"{R}/benchmarks/table/{_name}.json",
        conda:
            ENV
        log:
            f"{R}/logs/table/{_name}.log",
        benchmark:
            f"{R}/benchmarks/table/{_name}.tsv"
        localrule: True
        shell:
            "sharpflow table {params.kind} --spec {params.spec:q} --out-md {output.md:q} "
            "--out-tex {output.tex:q} --out-csv {output.csv:q} --timing {params.timing:q} {input.tables:q} "
            "2> {log:q}"

    ALL_TARGETS += [f"{R}/tables/{_name}.{ext}" for ext in ("md", "tex", "csv")]


# cost: where the time went, per stage, from every job's benchmark file (after everything else).
rule cost:
    input:
        list(ALL_TARGETS),
    output:
        md=f"{R}/tables/cost.md",
        csv=report(
            f"{R}/tables/cost.csv",
            caption=os.path.join(workflow.basedir, "workflow/report/cost.rst"),
            category="Cost",
            labels={"table": "cost", "kind": "cost"},
        ),
    params:
        results=lambda w, output: parent(output.md, 2),
    conda:
        ENV
    log:
        f"{R}/logs/cost.log",
    localrule: True
    shell:
        "sharpflow cost --results {params.results:q} --out-md {output.md:q} --out-csv {output.csv:q} 2> {log:q}"


ALL_TARGETS += [f"{R}/tables/cost.md", f"{R}/tables/cost.csv"]

# figure / table: one rule each, one job per configured item (the item's name is the wildcard), reading
# only the aggregated tables the item shows plus its own plotting module, so editing one plotting module
# reruns only the items of that kind. claims: each published claim's statistic and verdict. cost: where
# the time went. `snakemake --report` gathers every figure and table with its kind's caption.


rule figure:
    input:
        unpack(figure_inputs),
    output:
        pdf=figure_path("{name}", "pdf"),
        png=report(
            figure_path("{name}", "png"),
            caption="../report/figure.rst",
            category="Figures",
            labels=lambda w: {"figure": w.name, "kind": CFG.figures[w.name].kind},
        ),
    params:
        spec=lambda w: presentation_spec(CFG.figures[w.name]),
        kind=lambda w: CFG.figures[w.name].kind,
        timing=f"{R}/benchmarks/figure/{{name}}.json",
    conda:
        ENV
    log:
        f"{R}/logs/figure/{{name}}.log",
    benchmark:
        f"{R}/benchmarks/figure/{{name}}.tsv"
    wildcard_constraints:
        name=one_of(CFG.figures),
    localrule: True
    shell:
        "sharpflow figure {params.kind} --spec {params.spec:q} --out-pdf {output.pdf:q} "
        "--out-png {output.png:q} --timing {params.timing:q} {input.tables:q} 2> {log:q}"


rule table:
    input:
        unpack(table_inputs),
    output:
        md=table_path("{name}", "md"),
        tex=table_path("{name}", "tex"),
        csv=report(
            table_path("{name}", "csv"),
            caption="../report/table.rst",
            category="Tables",
            labels=lambda w: {"table": w.name, "kind": CFG.tables[w.name].kind},
        ),
    params:
        spec=lambda w: presentation_spec(CFG.tables[w.name]),
        kind=lambda w: CFG.tables[w.name].kind,
        timing=f"{R}/benchmarks/table/{{name}}.json",
    conda:
        ENV
    log:
        f"{R}/logs/table/{{name}}.log",
    benchmark:
        f"{R}/benchmarks/table/{{name}}.tsv"
    wildcard_constraints:
        name=one_of(CFG.tables),
    localrule: True
    shell:
        "sharpflow table {params.kind} --spec {params.spec:q} --out-md {output.md:q} "
        "--out-tex {output.tex:q} --out-csv {output.csv:q} --timing {params.timing:q} {input.tables:q} "
        "2> {log:q}"


# claims: each published claim, its statistic and verdict on the runs (tables/claims.*); in the final
# outputs when the config's claims are enabled.
rule claims:
    input:
        tables=claims_inputs(),
        code=[str(p) for p in claims_code_files()],
    output:
        md=table_path("claims", "md"),
        tex=table_path("claims", "tex"),
        csv=report(
            table_path("claims", "csv"),
            caption="../report/claims.rst",
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


# cost: where the time went, per stage, from every job's benchmark file (after everything else).
rule cost:
    input:
        final_outputs,
    output:
        md=table_path("cost", "md"),
        csv=report(
            table_path("cost", "csv"),
            caption="../report/cost.rst",
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

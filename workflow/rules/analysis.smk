# analyse: one job per warm-start chain of a run (spectrum.warm_chain consecutive checkpoints): the
# spectrum of each checkpoint in order, warm-started from the one before, then every registered
# analysis (sharpflow/analyses) selected at that checkpoint, in the same process. Every checkpoint
# keeps its own output files; a killed or rerun job reuses what it already computed (the run's
# analysis stash). aggregate: one Parquet per run and table kind.

for _run in ANALYSED:
    for _i, _chain in enumerate(CHAINS[_run]):

        rule:
            name:
                rule_name("analyse", _run) + f"_c{_i}"
            input:
                checkpoints=[ckpt_path(_run, s) for s in _chain],
                data=data_files(RUNS[_run].dataset),
            output:
                chain_outputs(_run, _chain),
            params:
                spectrum=SPEC_JSON[_run],
                analyses=chain_plan_json(_run, _chain),
                run=RUN_JSON[_run],
                name=_run,
                data=lambda w, input: parent(input.data[0]),
                results=R,
                version=dump_json_dict({k: FORMAT_VERSION[k] for k in ["spectrum", *ANALYSES]}),
            conda:
                ENV
            log:
                f"{R}/logs/analyse/{_run}/chain{_i:03d}.log",
            benchmark:
                f"{R}/benchmarks/analyse/{_run}/chain{_i:03d}.tsv"
            threads: chain_resources(_run, _chain)["threads"]
            resources:
                **{k: v for k, v in chain_resources(_run, _chain).items() if k != "threads"},
            shell:
                "sharpflow analyse --no-progress --threads {threads} --spectrum {params.spectrum:q} "
                "--analyses {params.analyses:q} --run {params.run:q} --run-name {params.name:q} "
                "--data {params.data:q} --results {params.results:q} {input.checkpoints:q} 2> {log:q}"


for _kind in TABLE_KINDS:

    rule:
        name:
            f"aggregate_{_kind}"
        input:
            per_checkpoint(_kind),
        output:
            f"{R}/runs/{{run}}/{_kind}.parquet",
        conda:
            ENV
        log:
            f"{R}/logs/aggregate/{{run}}/{_kind}.log",
        localrule: True
        shell:
            "sharpflow aggregate --out {output:q} {input:q} 2> {log:q}"

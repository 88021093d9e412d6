# spectrum and project: one job per (run, checkpoint); aggregate: one Parquet per run and kind.


rule spectrum:
    input:
        checkpoint=f"{R}/runs/{{run}}/checkpoints/step{{step}}.pt",
        data=run_data,
        previous=previous_eigvecs,
    output:
        table=f"{R}/runs/{{run}}/spectrum/step{{step}}.parquet",
        eigvecs=f"{R}/runs/{{run}}/eigvecs/step{{step}}.pt",
    params:
        spectrum=lambda w: SPEC_JSON[w.run],
        run=run_json,
        data=lambda w, input: parent(input.data[0]),
        previous=lambda w, input: f"--previous {input.previous[0]}" if input.previous else "",
        version=FORMAT_VERSION["spectrum"],
    conda:
        ENV
    log:
        f"{R}/logs/spectrum/{{run}}/step{{step}}.log",
    threads: RES.spectrum.threads
    resources:
        gpu=RES.spectrum.gpu,
        gpu_model=RES.spectrum.gpu_model,
        mem_mb=RES.spectrum.mem_mb,
        runtime=RES.spectrum.runtime,
    shell:
        "sharpflow spectrum --no-progress --threads {threads} --spectrum {params.spectrum:q} "
        "--run {params.run:q} --run-name {wildcards.run} --data {params.data:q} "
        "--checkpoint {input.checkpoint:q} {params.previous} --out-table {output.table:q} "
        "--out-eigvecs {output.eigvecs:q} 2> {log:q}"


rule project:
    input:
        checkpoint=f"{R}/runs/{{run}}/checkpoints/step{{step}}.pt",
        eigvecs=f"{R}/runs/{{run}}/eigvecs/step{{step}}.pt",
        data=run_data,
    output:
        [f"{R}/runs/{{run}}/project/{kind}/step{{step}}.parquet" for kind in PROJECT_KINDS],
    params:
        project=lambda w: PROJ_JSON[w.run],
        run=run_json,
        data=lambda w, input: parent(input.data[0]),
        out=lambda w, output: parent(output[0], 2),
        version=FORMAT_VERSION["project"],
    conda:
        ENV
    log:
        f"{R}/logs/project/{{run}}/step{{step}}.log",
    threads: RES.project.threads
    resources:
        gpu=RES.project.gpu,
        gpu_model=RES.project.gpu_model,
        mem_mb=RES.project.mem_mb,
        runtime=RES.project.runtime,
    shell:
        "sharpflow project --threads {threads} --project {params.project:q} --run {params.run:q} "
        "--run-name {wildcards.run} --data {params.data:q} --checkpoint {input.checkpoint:q} "
        "--eigvecs {input.eigvecs:q} --out-dir {params.out:q} 2> {log:q}"


for _kind in ["spectrum", *PROJECT_KINDS]:

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


rule escape:
    input:
        checkpoint=f"{R}/runs/{{run}}/checkpoints/step{{step}}.pt",
        eigvecs=f"{R}/runs/{{run}}/eigvecs/step{{step}}.pt",
        data=run_data,
    output:
        f"{R}/runs/{{run}}/escape/step{{step}}.parquet",
    params:
        escape=dump_json(CFG.escape),
        run=run_json,
        data=lambda w, input: parent(input.data[0]),
        version=FORMAT_VERSION["escape"],
    conda:
        ENV
    log:
        f"{R}/logs/escape/{{run}}/step{{step}}.log",
    threads: RES.project.threads
    resources:
        gpu=RES.project.gpu,
        gpu_model=RES.project.gpu_model,
        mem_mb=RES.project.mem_mb,
        runtime=RES.project.runtime,
    shell:
        "sharpflow escape --threads {threads} --escape {params.escape:q} --run {params.run:q} "
        "--run-name {wildcards.run} --data {params.data:q} --checkpoint {input.checkpoint:q} "
        "--eigvecs {input.eigvecs:q} --out-table {output:q} 2> {log:q}"


rule aggregate_escape:
    input:
        lambda w: [f"{R}/runs/{w.run}/escape/step{s:08d}.parquet" for s in ESCAPE[w.run]],
    output:
        f"{R}/runs/{{run}}/escape.parquet",
    conda:
        ENV
    log:
        f"{R}/logs/aggregate/{{run}}/escape.log",
    localrule: True
    shell:
        "sharpflow aggregate --out {output:q} {input:q} 2> {log:q}"

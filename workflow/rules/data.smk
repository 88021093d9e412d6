# prepare: one dataset into results/data/{dataset}/ (arrays, Hessian subset, meta.json).


rule prepare:
    output:
        data_files("{dataset}"),
    params:
        dataset=lambda w: dump_json(CFG.datasets[w.dataset]),
        out=lambda w, output: parent(output[0]),
        version=FORMAT_VERSION["prepare"],
    conda:
        ENV
    log:
        f"{R}/logs/prepare/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/prepare/{{dataset}}.tsv"
    wildcard_constraints:
        dataset=one_of(CFG.datasets),
    localrule: True  # downloads need the network, which compute nodes often lack
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "sharpflow prepare --no-progress --dataset {params.dataset:q} --out {params.out:q} 2> {log:q}"

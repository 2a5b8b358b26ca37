// Client: transformers.js (npm @huggingface/transformers) in Node, installed by setup_envs.sh into js/node_modules.
//
// The bundle is a local folder: env.allowRemoteModels = false, env.localModelPath = its parent, the model id = its
// name (transformers.js' documented way to load a local model). pipeline('text-generation') loads config.json,
// generation_config.json, tokenizer.json + tokenizer_config.json and onnx/model.onnx (dtype fp32: no file suffix).
// Each reference case goes through the pipeline's own model.generate() as token ids (greedy, do_sample false;
// the batch is left-padded and position ids come from the attention mask), so the comparison does not depend
// on the tokenizer; the pipeline's tokenizer is checked separately (encode the texts, decode the reference).
//
// Usage: node scripts/clients/run_transformersjs.mjs BUNDLE JOB   (prints one JSON line; see common.py)
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, 'js', 'package.json'));

function newResult() {
    return {
        client: 'transformers.js', versions: {}, loads: false, load_seconds: null, cases: [], tokenizer: null,
        notes: [], error: null, seconds: null,
    };
}

function seconds(start) {
    return Math.round((performance.now() - start)) / 1000;
}

// The version of the installed package `name`, found from its entry point (package.json is not in its exports).
function packageVersion(req, name) {
    let dir = path.dirname(req.resolve(name));
    while (dir !== path.dirname(dir)) {
        const file = path.join(dir, 'package.json');
        if (existsSync(file)) {
            const pkg = JSON.parse(readFileSync(file, 'utf8'));
            if (pkg.name === name) return pkg.version;
        }
        dir = path.dirname(dir);
    }
    return null;
}

function tensor(Tensor, rows) {
    const flat = BigInt64Array.from(rows.flat().map((v) => BigInt(v)));
    return new Tensor('int64', flat, [rows.length, rows[0].length]);
}

async function body(result, bundle, job) {
    // js/node_modules is not on this file's ESM resolution path: load the package's Node build through require
    const { env, pipeline, Tensor } = require('@huggingface/transformers');
    const fromTransformers = createRequire(require.resolve('@huggingface/transformers'));
    result.versions = {
        '@huggingface/transformers': packageVersion(require, '@huggingface/transformers'),
        'onnxruntime-node': packageVersion(fromTransformers, 'onnxruntime-node'),
        node: process.versions.node,
    };
    env.allowRemoteModels = false;
    env.allowLocalModels = true;
    env.localModelPath = path.dirname(path.resolve(bundle)) + path.sep;
    const start = performance.now();
    const generator = await pipeline('text-generation', path.basename(path.resolve(bundle)), {
        dtype: 'fp32',
        device: 'cpu',
        session_options: { intraOpNumThreads: job.threads, interOpNumThreads: 1 },
    });
    result.loads = true;
    result.load_seconds = seconds(start);
    for (const c of job.cases) {
        const width = c.input_ids[0].length;
        const output = await generator.model.generate({
            inputs: tensor(Tensor, c.input_ids),
            attention_mask: tensor(Tensor, c.attention_mask),
            max_new_tokens: job.new_tokens,
            do_sample: false,
            num_beams: 1,
        });
        const tokens = output.tolist().map((row) => row.slice(width).map((v) => Number(v)));
        result.cases.push({ name: c.name, tokens });
    }
    if (job.texts.length > 0) {
        const tok = generator.tokenizer;
        result.tokenizer = {
            class: tok.constructor.name,
            encode: job.texts.map((text) => tok.encode(text)),
            decode: job.expected.encode.map((ids) => tok.decode(ids)),
        };
    }
}

async function main() {
    const [bundle, jobPath] = process.argv.slice(2);
    if (!bundle || !jobPath) {
        console.error('usage: node run_transformersjs.mjs BUNDLE JOB');
        return 2;
    }
    const result = newResult();
    const start = performance.now();
    try {
        await body(result, bundle, JSON.parse(readFileSync(jobPath, 'utf8')));
    } catch (err) {
        // the client's failure is the finding: report it in the JSON, do not crash the table
        console.error(err?.stack ?? String(err));
        result.error = `${err?.name ?? 'Error'}: ${err?.message ?? String(err)}`.slice(0, 2000);
    }
    result.seconds = seconds(start);
    console.log(JSON.stringify(result));
    return result.error === null ? 0 : 1;
}

process.exitCode = await main();

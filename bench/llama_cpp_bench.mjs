#!/usr/bin/env node
// llama.cpp (through node-llama-cpp's prebuilt CPU build) on a GGUF file: the baseline moemesh is
// measured against, and the oracle its greedy tokens are compared with.
//
//   node bench/llama_cpp_bench.mjs --model M.gguf [--threads N]            measure, print JSON
//   node bench/llama_cpp_bench.mjs --model M.gguf --greedy --prompt-ids 1,2,3 --max-tokens 24
//                                                                            greedy ids as JSON
//
// Measure mode: batch-1 decode tok/s (short prompt, then --decode-tokens greedy tokens, timed from
// the first generated token to the last), prefill tok/s of a --prefill-tokens prompt, and batched
// decode of --sequences parallel sequences (one context, each sequence its own --seq-prompt-token
// prompt, then --seq-tokens new tokens; node-llama-cpp evaluates them in shared batches).
//
// node-llama-cpp is loaded from $MOEMESH_LLAMA_CPP_DIR or .cache/llama-cpp (scripts/bootstrap puts
// it there) with build: "never" and gpu: false, so it never downloads or compiles anything.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));

function die(msg, code = 2) {
  process.stderr.write(`llama_cpp_bench: ${msg}\n`);
  process.exit(code);
}

function parseArgs(argv) {
  const opts = {
    model: null, threads: 0, greedy: false, promptIds: null, maxTokens: 24,
    decodeTokens: 64, decodePrompt: 16, prefillTokens: 512,
    sequences: 32, seqPromptTokens: 128, seqTokens: 64,
  };
  const ints = {
    "--threads": "threads", "--max-tokens": "maxTokens", "--decode-tokens": "decodeTokens",
    "--decode-prompt": "decodePrompt", "--prefill-tokens": "prefillTokens", "--sequences": "sequences",
    "--seq-prompt-tokens": "seqPromptTokens", "--seq-tokens": "seqTokens",
  };
  for (let i = 0; i < argv.length; ++i) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) die(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--model") opts.model = value();
    else if (a === "--greedy") opts.greedy = true;
    else if (a === "--prompt-ids") {
      const v = value();
      opts.promptIds = v.split(",").map((s) => {
        if (!/^\d+$/.test(s.trim())) die(`--prompt-ids: "${s}" is not a token id`);
        return Number(s);
      });
    } else if (a in ints) {
      const v = value();
      if (!/^\d+$/.test(v)) die(`${a}: "${v}" is not a non-negative integer`);
      opts[ints[a]] = Number(v);
    } else if (a === "-h" || a === "--help") {
      process.stdout.write(fs.readFileSync(fileURLToPath(import.meta.url), "utf8").split("\nimport ")[0] + "\n");
      process.exit(0);
    } else die(`unknown argument ${a}`);
  }
  if (!opts.model) die("--model FILE.gguf is required");
  if (!fs.existsSync(opts.model)) die(`--model: ${opts.model} does not exist`);
  if (opts.greedy && (!opts.promptIds || opts.promptIds.length === 0)) die("--greedy needs --prompt-ids");
  for (const k of ["maxTokens", "decodeTokens", "prefillTokens", "sequences", "seqTokens"])
    if (opts[k] < 1) die(`--${k.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase())} must be at least 1`);
  return opts;
}

async function loadNodeLlamaCpp() {
  const dir = process.env.MOEMESH_LLAMA_CPP_DIR || path.join(here, "..", ".cache", "llama-cpp");
  const entry = path.join(dir, "node_modules", "node-llama-cpp", "dist", "index.js");
  if (!fs.existsSync(entry)) die(`node-llama-cpp is not installed at ${dir} (run scripts/bootstrap)`, 3);
  return import(pathToFileURL(entry).href);
}

// Deterministic prompt ids in [100, 1000): ordinary tokens in any vocabulary we export.
function promptIds(n, seed) {
  let x = (seed * 2654435761 + 12345) >>> 0;
  const out = [];
  for (let i = 0; i < n; ++i) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    out.push(100 + (x % 900));
  }
  return out;
}

// Greedy generation on a fresh sequence: EOS is yielded and generation goes on (the caller counts
// tokens, as `moemesh generate --ignore-eos` does). Returns the ids and each token's arrival time.
async function generate(sequence, prompt, n) {
  const ids = [];
  const times = [];
  const it = sequence.evaluate(prompt, { temperature: 0, yieldEogToken: true });
  for await (const token of it) {
    ids.push(token);
    times.push(performance.now());
    if (ids.length >= n) break;
  }
  return { ids, times };
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const { getLlama, LlamaLogLevel } = await loadNodeLlamaCpp();
  // maxThreads 0: a context's `threads` is then exactly the number used.
  const llama = await getLlama({
    gpu: false, build: "never", usePrebuiltBinaries: true, skipDownload: true, progressLogs: false,
    logLevel: LlamaLogLevel.error, maxThreads: 0,
  });
  const threads = opts.threads > 0 ? opts.threads : llama.cpuMathCores;
  const model = await llama.loadModel({ modelPath: opts.model, gpuLayers: 0 });
  const info = {
    llama_cpp: llama.llamaCppRelease, build: llama.buildType, gpu: llama.gpu, threads,
    model: path.resolve(opts.model), model_bytes: fs.statSync(opts.model).size,
  };

  if (opts.greedy) {
    // f32 KV cache and no flash attention: the oracle should round only where the weights do.
    const ctx = await model.createContext({
      sequences: 1, contextSize: opts.promptIds.length + opts.maxTokens + 8, threads, flashAttention: false,
      experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32",
    });
    const { ids } = await generate(ctx.getSequence(), opts.promptIds, opts.maxTokens);
    process.stdout.write(JSON.stringify({ ...info, prompt_ids: opts.promptIds, output_ids: ids }) + "\n");
    await ctx.dispose();
    await model.dispose();
    await llama.dispose();
    return;
  }

  const result = { ...info };
  {
    const ctx = await model.createContext({
      sequences: 1, contextSize: Math.max(opts.prefillTokens, opts.decodePrompt + opts.decodeTokens) + 16,
      batchSize: opts.prefillTokens, threads,
    });
    const seq = ctx.getSequence();
    await generate(seq, promptIds(8, 99), 4);  // warm-up: graph allocation, pages of the weights
    await seq.clearHistory();

    const { ids, times } = await generate(seq, promptIds(opts.decodePrompt, 1), opts.decodeTokens + 1);
    const decodeS = (times[times.length - 1] - times[0]) / 1000;
    result.decode = { batch: 1, prompt_tokens: opts.decodePrompt, tokens: ids.length - 1, tok_s: (ids.length - 1) / decodeS };
    await seq.clearHistory();

    // Prefill: the whole prompt in one batch, no token generated.
    const prompt = promptIds(opts.prefillTokens, 2);
    const t0 = performance.now();
    await seq.evaluateWithoutGeneratingNewTokens(prompt);
    const prefillS = (performance.now() - t0) / 1000;
    result.prefill = { tokens: opts.prefillTokens, tok_s: opts.prefillTokens / prefillS, seconds: prefillS };
    await ctx.dispose();
  }
  {
    // Batched decode: contextSize is per sequence; node-llama-cpp puts the concurrent sequences'
    // tokens into shared llama_decode batches.
    const ctx = await model.createContext({
      sequences: opts.sequences, contextSize: opts.seqPromptTokens + opts.seqTokens + 16,
      batchSize: Math.max(512, opts.sequences), threads,
    });
    const seqs = Array.from({ length: opts.sequences }, () => ctx.getSequence());
    await Promise.all(seqs.map((s, i) => generate(s, promptIds(8, 1000 + i), 2)));  // warm-up
    await Promise.all(seqs.map((s) => s.clearHistory()));

    const t0 = performance.now();
    const runs = await Promise.all(seqs.map((s, i) => generate(s, promptIds(opts.seqPromptTokens, 100 + i), opts.seqTokens)));
    const t1 = performance.now();
    const generated = runs.reduce((n, r) => n + r.ids.length, 0);
    // Steady-state decode: from the moment the last sequence got its first token (all prompts done).
    const allStarted = Math.max(...runs.map((r) => r.times[0]));
    const afterStart = runs.reduce((n, r) => n + r.times.filter((t) => t > allStarted).length, 0);
    result.sequences = {
      sequences: opts.sequences, prompt_tokens: opts.seqPromptTokens, new_tokens: opts.seqTokens,
      output_tok_s: generated / ((t1 - t0) / 1000),
      decode_tok_s: afterStart / ((t1 - allStarted) / 1000),
      seconds: (t1 - t0) / 1000,
      ttft_median_s: median(runs.map((r) => (r.times[0] - t0) / 1000)),
    };
    await ctx.dispose();
  }
  process.stdout.write(JSON.stringify(result) + "\n");
  await model.dispose();
  await llama.dispose();
}

main().catch((e) => die(e && e.stack ? e.stack : String(e), 1));

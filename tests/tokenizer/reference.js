// Reference tokenization with @lenml/tokenizers (a port of transformers.js), an independent
// implementation the C++ tokenizer is checked against.
//
//   node reference.js CACHE_DIR NAME CORPUS.json [CHATS.json]
//
// NAME is llama2 or deepseek_v3 (bootstrap's CACHE_DIR/tokenizer-NAME package). Prints JSON:
//   {config, encodings: [{text, ids, ids_special, decoded, decoded_skip}], chats: [{text}|{error}]}
// `config` is the tokenizer_config the reference used: the package's models/ file when it has
// one, otherwise the config bundled in the package's JS build (the llama2 package ships only
// that), so the C++ side can load exactly the same one.
"use strict";
const fs = require("fs");
const path = require("path");

function die(msg) {
  process.stderr.write(`reference.js: ${msg}\n`);
  process.exit(2);
}

const [cacheArg, name, corpusPath, chatsPath] = process.argv.slice(2);
const cacheDir = cacheArg && path.resolve(cacheArg);
if (!cacheArg || !name || !corpusPath) die("usage: node reference.js CACHE_DIR NAME CORPUS.json [CHATS.json]");

const libDir = path.join(cacheDir, "js", "node_modules", "@lenml", "tokenizers");
if (!fs.existsSync(libDir)) die(`${libDir} is missing: run scripts/bootstrap`);
const { TokenizerLoader } = require(libDir);

const pkgDir = path.join(cacheDir, `tokenizer-${name}`);
const tokenizerPath = path.join(pkgDir, "models", "tokenizer.json");
if (!fs.existsSync(tokenizerPath)) die(`${tokenizerPath} is missing: run scripts/bootstrap`);
const tokenizerJSON = JSON.parse(fs.readFileSync(tokenizerPath, "utf8"));

let tokenizerConfig;
const configPath = path.join(pkgDir, "models", "tokenizer_config.json");
if (fs.existsSync(configPath)) {
  tokenizerConfig = JSON.parse(fs.readFileSync(configPath, "utf8"));
} else {
  // The package's bundle requires "@lenml/tokenizers"; point module resolution at the cache.
  process.env.NODE_PATH = path.join(cacheDir, "js", "node_modules");
  require("module").Module._initPaths();
  const bundled = require(path.join(pkgDir, "dist", "main.js")).tokenizerConfig;
  tokenizerConfig = { ...bundled };
  delete tokenizerConfig.default;  // ES-module interop artefact, not a config key
}

const tok = TokenizerLoader.fromPreTrained({ tokenizerJSON, tokenizerConfig });

const decode = (ids, skip) => (ids.length === 0 ? "" : tok.decode(ids, { skip_special_tokens: skip }));

const corpus = JSON.parse(fs.readFileSync(corpusPath, "utf8")).texts;
const encodings = corpus.map((text) => {
  const ids = tok.encode(text, { add_special_tokens: false });
  const ids_special = tok.encode(text, { add_special_tokens: true });
  return { text, ids, ids_special, decoded: decode(ids, false), decoded_skip: decode(ids_special, true) };
});

let chats = [];
if (chatsPath) {
  chats = JSON.parse(fs.readFileSync(chatsPath, "utf8")).map((c) => {
    try {
      const text = tok.apply_chat_template(c.messages, {
        chat_template: c.template ?? null,
        add_generation_prompt: !!c.add_generation_prompt,
        tokenize: false,
      });
      return { text };
    } catch (e) {
      return { error: String(e && e.message ? e.message : e) };
    }
  });
}

process.stdout.write(JSON.stringify({ config: tokenizerConfig, encodings, chats }));

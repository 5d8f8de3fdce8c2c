// Structured outputs and tool calls through the official `openai` npm client, every output checked
// by an independent validator (ajv + ajv-formats). Usage:
//   node structured_outputs.mjs BASE_URL MODEL REQUESTS EOS_ID   (NODE_PACKAGES: node_modules with openai, ajv, zod)
import { createRequire } from "node:module";
import assert from "node:assert/strict";

const require = createRequire(process.env.NODE_PACKAGES + "/");
const { OpenAI, BadRequestError } = require("openai");
const { zodResponseFormat } = require("openai/helpers/zod");
const { z } = require("zod");
const Ajv = require("ajv");
const addFormats = require("ajv-formats");
const [baseURL, model, requestsArg, eosArg] = process.argv.slice(2);
const total = Number(requestsArg || 200);
const client = new OpenAI({ baseURL: baseURL + "/v1", apiKey: "unused-in-open-mode", maxRetries: 0 });
const ajv = new Ajv({ strict: false, allErrors: true });
addFormats(ajv);

const schemas = [
  { type: "object", properties: { name: { type: "string", maxLength: 12 }, age: { type: "integer", minimum: 0, maximum: 130 } },
    required: ["name", "age"], additionalProperties: false },
  { type: "object", properties: { tags: { type: "array", items: { type: "string", maxLength: 6 }, minItems: 1, maxItems: 3 } },
    required: ["tags"] },
  { type: "object", properties: { color: { enum: ["red", "green", "blue"] }, hex: { type: "string", pattern: "^#[0-9a-f]{6}$" } },
    required: ["color", "hex"] },
  { type: "object", properties: { price: { type: "number", minimum: 0, maximum: 1000 }, currency: { const: "EUR" } },
    required: ["price", "currency"] },
  { type: "object", properties: { when: { type: "string", format: "date-time" }, id: { type: "string", format: "uuid" } },
    required: ["when", "id"] },
  { type: "object", properties: { point: { type: "object", properties: { x: { type: "integer" }, y: { type: "integer" } },
    required: ["x", "y"], additionalProperties: false } }, required: ["point"] },
  { type: "object", properties: { value: { anyOf: [{ type: "integer", minimum: -10, maximum: 10 }, { type: "null" }, { type: "boolean" }] } },
    required: ["value"] },
  { type: "array", items: { type: "integer", exclusiveMinimum: 0, maximum: 99 }, minItems: 2, maxItems: 4 },
  { type: "object", properties: { steps: { type: "array", maxItems: 2, items: { type: "object",
    properties: { n: { type: "integer" }, ok: { type: "boolean" } }, required: ["n", "ok"] } } }, required: ["steps"] },
  { type: "object", properties: { tree: { $ref: "#/$defs/node" } }, required: ["tree"],
    $defs: { node: { type: "object", properties: { v: { type: "integer", minimum: 0, maximum: 9 },
      kids: { type: "array", maxItems: 2, items: { $ref: "#/$defs/node" } } }, required: ["v"] } } },
];
const validators = schemas.map((s) => ajv.compile(s));
const messages = [{ role: "user", content: "Answer in JSON." }];

// 1. Many requests over the schemas, concurrently: every output parses and conforms.
let valid = 0;
const failures = [];
const one = async (i) => {
  const k = i % schemas.length;
  const r = await client.chat.completions.create({
    model, messages, temperature: 1, seed: i, max_tokens: 120,
    response_format: { type: "json_schema", json_schema: { name: `s${k}`, schema: schemas[k], strict: true } },
  });
  const text = r.choices[0].message.content;
  let obj;
  try {
    obj = JSON.parse(text);
  } catch (e) {
    failures.push(`schema ${k}: not JSON: ${text}`);
    return;
  }
  if (validators[k](obj)) valid++;
  else failures.push(`schema ${k}: ${ajv.errorsText(validators[k].errors)}: ${text}`);
};
const started = Date.now();
for (let i = 0; i < total; i += 16) await Promise.all(Array.from({ length: Math.min(16, total - i) }, (_, j) => one(i + j)));
console.log(`json_schema: ${valid}/${total} valid over ${schemas.length} schemas in ${(Date.now() - started) / 1000} s`);
for (const f of failures.slice(0, 5)) console.log("  " + f);
assert.equal(valid, total, "every constrained output conforms to its schema");

// json_object: an object, whatever the model.
const obj = await client.chat.completions.create({ model, messages, max_tokens: 60, response_format: { type: "json_object" } });
assert.equal(typeof JSON.parse(obj.choices[0].message.content), "object");

// 2. chat.completions.parse with a zod schema gives a parsed object. The name is a pattern, not
// .max(10): JSON Schema's maxLength counts code points, zod's .max() UTF-16 units ("Ab🙂" is 3 and 4).
const Person = z.object({ name: z.string().regex(/^[A-Za-z ]{1,10}$/), age: z.number().int().min(0).max(120), pets: z.array(z.enum(["cat", "dog"])).max(2) });
const parsed = await client.chat.completions.parse({ model, messages, max_tokens: 100, response_format: zodResponseFormat(Person, "person") });
const person = parsed.choices[0].message.parsed;
assert.ok(person && typeof person.name === "string" && Number.isInteger(person.age), JSON.stringify(person));
console.log("zod parse:", JSON.stringify(person));

// 3. Tool calls: forced (named and required) calls always parse and validate.
const weather = { type: "object", properties: { city: { type: "string", maxLength: 10 }, unit: { enum: ["c", "f"] } },
  required: ["city", "unit"], additionalProperties: false };
const tools = [
  { type: "function", function: { name: "get_weather", description: "Weather in a city", parameters: weather } },
  { type: "function", function: { name: "add", parameters: { type: "object", properties: { a: { type: "integer" }, b: { type: "integer" } }, required: ["a", "b"] } } },
];
const argsValid = { get_weather: ajv.compile(weather), add: ajv.compile(tools[1].function.parameters) };
for (let i = 0; i < 20; i++) {
  const tool_choice = i % 2 ? "required" : { type: "function", function: { name: "get_weather" } };
  const r = await client.chat.completions.create({ model, messages, tools, tool_choice, seed: i, max_tokens: 250, parallel_tool_calls: false });
  const c = r.choices[0];
  assert.equal(c.finish_reason, "tool_calls", JSON.stringify(c));
  assert.equal(c.message.tool_calls.length, 1);
  const call = c.message.tool_calls[0];
  if (i % 2 === 0) assert.equal(call.function.name, "get_weather");
  assert.ok(argsValid[call.function.name](JSON.parse(call.function.arguments)), call.function.arguments);
  assert.ok(call.id.startsWith("call_"));
}
console.log("forced tool calls: 20/20 parse and validate");

// auto: a random model does not write the call marker, so the answer is plain content; pushed to
// EOS after a few tokens (a bias on EOS, whose first draw at temperature 1 ends it), it stops.
const auto = await client.chat.completions.create({ model, messages, tools, max_tokens: 12, temperature: 0 });
assert.ok(!auto.choices[0].message.tool_calls, JSON.stringify(auto.choices[0]));
assert.notEqual(auto.choices[0].finish_reason, "tool_calls");
assert.equal(typeof auto.choices[0].message.content, "string");
const ended = await client.chat.completions.create({ model, messages, tools, max_tokens: 12, logit_bias: { [eosArg]: 100 } });
assert.equal(ended.choices[0].finish_reason, "stop", JSON.stringify(ended.choices[0]));
assert.ok(!ended.choices[0].message.tool_calls);
assert.equal(typeof ended.choices[0].message.content, "string");

// Streamed forced calls reassemble, call by call (deltas carry their call's index), to the
// unstreamed ones (same seed); "required" lets the model make more than one.
const req = { model, messages, tools, tool_choice: "required", seed: 5, max_tokens: 250, temperature: 1 };
const whole = (await client.chat.completions.create(req)).choices[0].message.tool_calls;
const streamed = [];
let finish = null;
for await (const chunk of await client.chat.completions.create({ ...req, stream: true })) {
  for (const c of chunk.choices) {
    for (const t of c.delta?.tool_calls ?? []) {
      streamed[t.index] ??= { name: "", args: "" };
      streamed[t.index].name += t.function?.name ?? "";
      streamed[t.index].args += t.function?.arguments ?? "";
    }
    if (c.finish_reason) finish = c.finish_reason;
  }
}
assert.equal(finish, "tool_calls");
assert.deepEqual(streamed, whole.map((t) => ({ name: t.function.name, args: t.function.arguments })));
console.log(`streamed tool calls reassemble: ${streamed.length} call(s),`, streamed[0].name, streamed[0].args);

// 4. The rest of the surface: token ids on stream chunks, logit_bias, and refusals by name.
let ids = [];
for await (const chunk of await client.completions.create({ model, prompt: "Hi", max_tokens: 5, temperature: 0, stream: true, return_token_ids: true })) {
  for (const c of chunk.choices) ids = ids.concat(c.token_ids ?? []);
}
const unstreamed = await client.completions.create({ model, prompt: "Hi", max_tokens: 5, temperature: 0, return_token_ids: true });
assert.deepEqual(ids, unstreamed.choices[0].token_ids);
const biased = await client.completions.create({ model, prompt: "Hi", max_tokens: 4, temperature: 1, logit_bias: { "500": 100 }, return_token_ids: true });
assert.deepEqual(biased.choices[0].token_ids, [500, 500, 500, 500]);
const refusals = [
  [{ response_format: { type: "json_schema", json_schema: { name: "x", schema: { oneOf: [{ type: "string" }] } } } }, "oneOf"],
  [{ response_format: { type: "json_schema", json_schema: { name: "x", schema: { type: "array", uniqueItems: true } } } }, "uniqueItems"],
  [{ tools: [{ type: "function", function: { name: "f", parameters: { type: "object", patternProperties: {} } } }] }, "patternProperties"],
  [{ prediction: { type: "content", content: "x" } }, "prediction"],
  [{ audio: { voice: "x" } }, "audio"],
];
for (const [extra, word] of refusals) {
  await assert.rejects(client.chat.completions.create({ model, messages, max_tokens: 40, ...extra }),
    (e) => e instanceof BadRequestError && e.status === 400 && e.message.includes(word), word);
}
console.log(`refused by name: ${refusals.map((r) => r[1]).join(", ")}`);
const alive = await client.chat.completions.create({ model, messages, max_tokens: 2 });
assert.equal(alive.object, "chat.completion");
console.log("structured outputs: OK");

// The Responses API through the official `openai` npm client: responses.create (plain and
// streamed), a 6-turn conversation by previous_response_id with --keep-turns 5, reuse of the
// conversation's KV blocks, tenants' responses kept apart, retrieve / inputItems / delete. Usage:
//   node responses_client.mjs BASE_URL MODEL KEY_A KEY_B   (NODE_PACKAGES: node_modules with openai)
import { createRequire } from "node:module";
import assert from "node:assert/strict";

const require = createRequire(process.env.NODE_PACKAGES + "/");
const { OpenAI, NotFoundError } = require("openai");
const [baseURL, model, keyA, keyB] = process.argv.slice(2);
const a = new OpenAI({ baseURL: baseURL + "/v1", apiKey: keyA, maxRetries: 0 });
const b = new OpenAI({ baseURL: baseURL + "/v1", apiKey: keyB, maxRetries: 0 });

const first = await a.responses.create({ model, input: "Tell me a story about a lighthouse keeper.", max_output_tokens: 8, temperature: 0 });
assert.equal(first.object, "response");
assert.ok(["completed", "incomplete"].includes(first.status));
assert.equal(typeof first.output_text, "string");
assert.ok(first.usage.output_tokens >= 1 && first.usage.output_tokens <= 8);
console.log("create:", first.id, first.status, JSON.stringify(first.output_text));

// Streamed: the events in order, the deltas adding up to the final text (same seed, greedy).
const types = [];
let deltas = "", completed = null;
for await (const ev of await a.responses.create({ model, input: "Tell me a story about a lighthouse keeper.", max_output_tokens: 8, temperature: 0, stream: true, store: false })) {
  types.push(ev.type);
  if (ev.type === "response.output_text.delta") deltas += ev.delta;
  if (ev.type === "response.completed" || ev.type === "response.incomplete") completed = ev.response;
}
assert.equal(types[0], "response.created");
assert.ok(types.includes("response.output_text.delta"), types.join(","));
assert.ok(["response.completed", "response.incomplete"].includes(types.at(-1)), types.join(","));
assert.equal(deltas, completed.output[0].content[0].text);
assert.equal(deltas, first.output_text, "streamed and plain answers are the same greedy text");
console.log("stream:", types.length, "events:", [...new Set(types)].join(", "));

// Six turns through previous_response_id: from turn 2 the conversation's blocks come from the
// cache. Turn 5 is streamed to time its first token against the same conversation sent whole by a
// tenant with no cached blocks of it (turn 6 drops turn 1 under --keep-turns 5, so it shares no
// prefix with the turns before it).
const ttft = async (client, body) => {
  const t0 = performance.now();
  let t = null, done = null;
  for await (const ev of await client.responses.create({ ...body, stream: true })) {
    if (ev.type === "response.output_text.delta" && t === null) t = performance.now() - t0;
    if (ev.type === "response.completed" || ev.type === "response.incomplete") done = ev.response;
  }
  return [t ?? performance.now() - t0, done];
};
const say = (i) => `Turn ${i}: tell me more, please, in detail and at length.`;
const turns = [];
let prev = undefined, warm = 0, cold = 0, coldCached = -1;
for (let i = 1; i <= 6; i++) {
  const body = { model, input: say(i), previous_response_id: prev, max_output_tokens: 6, temperature: 0 };
  let r;
  if (i === 5) {
    const whole = [];
    for (let k = 0; k < 4; k++) whole.push({ role: "user", content: say(k + 1) }, { role: "assistant", content: turns[k].output_text });
    whole.push({ role: "user", content: say(5) });
    [cold, r] = await ttft(b, { model, input: whole, max_output_tokens: 6, temperature: 0, store: false });
    coldCached = r.usage.input_tokens_details.cached_tokens;
    [warm, r] = await ttft(a, body);
  } else {
    r = await a.responses.create(body);
  }
  turns.push(r);
  prev = r.id;
  console.log(`turn ${i}: input_tokens ${r.usage.input_tokens}, cached ${r.usage.input_tokens_details.cached_tokens}`);
}
console.log(`turn 5 TTFT: ${warm.toFixed(1)} ms continuing (${turns[4].usage.input_tokens_details.cached_tokens} cached tokens), ` +
            `${cold.toFixed(1)} ms sent whole by another tenant (${coldCached} cached)`);
assert.equal(coldCached, 0, "another tenant's request found this tenant's blocks");
for (let i = 1; i < 5; i++) assert.ok(turns[i].usage.input_tokens_details.cached_tokens > 0, `turn ${i + 1} reused no KV`);
const items = await a.responses.inputItems.list(turns[5].id);
const users = items.data.filter((m) => m.role === "user").map((m) => m.content[0].text);
assert.deepEqual(users, [2, 3, 4, 5, 6].map(say), "only the last 5 turns reach the model");
assert.equal(items.data.filter((m) => m.role === "assistant").length, 4);

// Tenants: B cannot continue, read or delete A's responses.
await assert.rejects(b.responses.create({ model, input: "hi", previous_response_id: turns[5].id, max_output_tokens: 2 }), (e) => e instanceof NotFoundError);
await assert.rejects(b.responses.retrieve(turns[5].id), (e) => e instanceof NotFoundError);
await assert.rejects(b.responses.delete(turns[5].id), (e) => e instanceof NotFoundError);
const again = await a.responses.retrieve(turns[5].id);
assert.equal(again.output[0].content[0].text, turns[5].output_text);

await a.responses.delete(turns[0].id);
await assert.rejects(a.responses.retrieve(turns[0].id), (e) => e instanceof NotFoundError);
console.log("responses: OK");

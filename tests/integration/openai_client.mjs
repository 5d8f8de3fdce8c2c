// The official `openai` npm client against a moemesh router: completion, chat, streaming chat,
// and an error surfacing as the client's typed exception. Usage:
//   node openai_client.mjs BASE_URL MODEL   (NODE_PACKAGES: the node_modules folder holding openai)
import { createRequire } from "node:module";
import assert from "node:assert/strict";

const require = createRequire(process.env.NODE_PACKAGES + "/");
const { OpenAI, BadRequestError } = require("openai");
const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL: baseURL + "/v1", apiKey: "unused-in-open-mode", maxRetries: 0 });

const completion = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 8, temperature: 0 });
assert.equal(completion.object, "text_completion");
assert.equal(typeof completion.choices[0].text, "string");
assert.ok(completion.usage.completion_tokens >= 1 && completion.usage.completion_tokens <= 8);
console.log("completion:", JSON.stringify(completion.choices[0].text), completion.usage);

const messages = [{ role: "user", content: "Say hello." }];
const chat = await client.chat.completions.create({ model, messages, max_completion_tokens: 10, temperature: 0 });
assert.equal(chat.object, "chat.completion");
assert.equal(chat.choices[0].message.role, "assistant");
console.log("chat:", JSON.stringify(chat.choices[0].message.content), chat.choices[0].finish_reason, chat.usage);

const stream = await client.chat.completions.create({
  model, messages, max_completion_tokens: 10, temperature: 0, stream: true, stream_options: { include_usage: true },
});
let content = "", chunks = 0, usage = null, finish = null;
for await (const chunk of stream) {
  chunks++;
  if (chunk.usage) usage = chunk.usage;
  for (const c of chunk.choices) {
    content += c.delta?.content ?? "";
    if (c.finish_reason) finish = c.finish_reason;
  }
}
assert.equal(content, chat.choices[0].message.content, "streamed chat differs from the unstreamed one");
assert.equal(finish, chat.choices[0].finish_reason);
assert.deepEqual(usage.completion_tokens, chat.usage.completion_tokens);
console.log(`streaming chat: ${chunks} chunks, same content, usage`, usage);

await assert.rejects(
  client.chat.completions.create({ model, messages, temperature: 7 }),
  (e) => e instanceof BadRequestError && e.status === 400 && e.param === "temperature",
);
console.log("bad temperature: BadRequestError 400 with param 'temperature'");
console.log("openai client: OK");

// Asks a moemesh router each prompt through the official `openai` npm client (chat, greedy) and
// prints the answers as one JSON array. Usage:
//   node ask_openai.mjs BASE_URL MODEL PROMPTS.json   (NODE_PACKAGES: the node_modules holding openai)
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(process.env.NODE_PACKAGES + "/");
const { OpenAI } = require("openai");
const [baseURL, model, promptsFile] = process.argv.slice(2);
const client = new OpenAI({ baseURL: baseURL + "/v1", apiKey: "unused-in-open-mode", maxRetries: 0 });
const answers = [];
for (const prompt of JSON.parse(readFileSync(promptsFile, "utf8"))) {
  const chat = await client.chat.completions.create({
    model, messages: [{ role: "user", content: prompt }], temperature: 0, max_tokens: 16,
  });
  answers.push(chat.choices[0].message.content);
}
console.log(JSON.stringify(answers));

// Chat templates for checkpoints whose tokenizer_config.json ships none.
#pragma once

namespace moemesh {

// Mistral / Mixtral-8x7B-Instruct-v0.1.
inline constexpr const char* kMixtralChatTemplate =
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}";

}  // namespace moemesh

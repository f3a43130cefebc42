"""WaferMapVMQA: knowledge base, facts from maps, dialogues, tokenizer, chat format, encoding.

  knowledge_base.py  load_knowledge_base(path=None) -> KnowledgeBase (schema-checked JSON)
  facts.py           compute_facts(map), type_location(...), lot_index(meta), lot_context(...),
                     batch_answer(context, types)
  answers.py         render_answer(kind, value, kb, count_form=, zone_form=), parse_answer(kind,
                     text, kb) (evaluation)
  phrasings.py       TRAIN / HELDOUT question phrasings per kind
  dialogues.py       build_dialogues(dataset, ...) -> items; transform_item(item, map, k, flip);
                     map_context / first_user_turn (die count (and, for zone_form
                     'share_first', dies per zone) and lot context lines, also used by the chat)
  drills.py          build_count_drills(dataset, prob=, turns=, seed=) -> training-only count
                     drills (a stated failing share -> the count sentence)
  augment.py         noise_questions / frame_questions (training question wording)
  io.py              write_vmqa / load_vmqa (JSONL + maps npz), TFDS ArrayRecord for grain
  tokenizer.py       train/save/load tokenizer, CHAT_TEMPLATE with {% generation %} marks
  encode.py          encode_dialogue / encode_items / encode_prompt, bucketed_batches
  build.py           build_vmqa(splits, out_dir) -> items, files, tokenizer (one call)
"""

"""Question phrasings per kind: TRAIN ones are used for training dialogues, HELDOUT ones only
for held-out dialogues (generalisation to unseen wording). `{zone}` is filled with the zone
asked about in zone_extent follow-ups, `{pattern}` with the pattern of type_location questions.

The first 6-10 training phrasings of each kind are the original bank; the ones after the
"wider bank" mark were added later (5-15 more per kind, 11-25 in all) because a language
model trained from scratch on ten phrasings per kind reads one familiar word as the kind
("this map" -> yield). On three real-data seeds they raised held-out answers by 7 to 10
points, but not defect type (README "Wider training-phrasing bank").
They were written with HELDOUT_ONLY_WORDS kept out, and without copying a held-out phrasing's
structure, so the held-out phrasings stay as unseen as before (tests/test_qa_augment.py).
The last few of location, type_location and cause come from the "ambiguous-word bank": words
that ask plainly for more than one kind (AMBIGUOUS_WORDS) were each used by one kind only, so
the model read "area" as the area question and "where" as a location question whatever
the rest said (README "Ambiguous words in the training bank").
Append only: a dialogue's plan stores the index of its phrasing (`q`), so reordering a list
would change what existing VMQA files mean.
"""

# Words of the held-out phrasings that no training phrasing or frame used when the held-out
# bank was fixed: training text must never use them, or the held-out wording is no longer
# unseen. Pinned here (not recomputed) so that adding training phrasings cannot shrink it.
HELDOUT_ONLY_WORDS = frozenset({
    "any", "as", "behind", "best", "bin", "class", "classification", "cluster", "come",
    "corrective", "correlation", "critical", "estimate", "fab", "fits", "from", "good-die",
    "holds", "identify", "justify", "keeper", "left", "lot-level", "might", "mode", "near",
    "now", "out", "point", "portion", "rating", "rationale", "reasoning", "rejected", "report",
    "revisited", "settings", "showing", "signature", "sister", "sits", "suggest", "surface",
    "take", "tally", "thing", "tool", "up", "well", "were", "what's", "whereabouts", "your"})

# Plain words that ask for more than one kind ("Which area fails?" is a location question, "How
# large is the failing area?" an area one; "Where ..." asks for a place or for an origin): each
# kind listed must use the word in at least two training phrasings, so that the word alone
# never names the kind (tests/test_qa_augment.py).
AMBIGUOUS_WORDS = {
    "area": ("location", "area"),
    "where": ("location", "type_location", "cause"),
    "kind": ("defect_type", "cause"),
}

TRAIN = {
    "defect_type": [
        "What defect pattern does this wafer map show?",
        "Which failure pattern is on this wafer?",
        "Classify the defect pattern of this wafer.",
        "What kind of defect do you see here?",
        "Is there a defect pattern on this wafer? Which one?",
        "What type of failure pattern is this?",
        "Tell me the defect type of this wafer map.",
        "Which pattern category does this map belong to?",
        "Name the defect pattern(s) on this wafer.",
        "What pattern do the failing dies form?",
        # wider bank (module docstring)
        "Which defect pattern is visible on this map?",
        "What is the defect pattern on this wafer map?",
        "Which pattern do you recognise on this wafer?",
        "Classify this wafer map.",
        "What category of defect is on this map?",
        "Which defect type matches this map?",
        "What kind of failure pattern is on this map?",
        "Diagnose the defect pattern of this wafer.",
        "What failure type does the map show?",
        "Label the defect pattern on this map.",
        "Which defect category describes this wafer?",
        "Look at this map: which defect pattern is it?",
        "What type of defect does this wafer have?",
        "Which failure pattern do the bad dies form on this map?",
        "Name the pattern of the failures on this wafer map.",
    ],
    "why_type": [
        "Why?",
        "Why do you say that?",
        "How can you tell?",
        "What makes it that pattern?",
        "Can you explain?",
        "On what basis?",
        # wider bank (module docstring)
        "What evidence supports that?",
        "Why that pattern?",
        "What do you base that on?",
        "Explain why.",
        "How do you know?",
    ],
    "location": [
        "Where are the failing dies located?",
        "Where on the wafer are the failures?",
        "In which region do the defects appear?",
        "Where is the failure concentrated?",
        "Which part of the wafer is affected?",
        "Describe the location of the failing dies.",
        "Where do the bad dies sit on the wafer?",
        "Locate the defect on this wafer.",
        # wider bank (module docstring)
        "Where on this map are the failing dies?",
        "Which region of this wafer map fails?",
        "Where do the failures sit on this map?",
        "In which part of the map are the bad dies?",
        "Where are the defects on this wafer map?",
        "Describe where the failures are on this map.",
        "Which zone of the wafer has the failing dies?",
        "Where is the defect located on this map?",
        "Show the region where the dies fail.",
        "Which region is affected?",
        "Where are the fails concentrated on the wafer?",
        "Where does the wafer fail?",
        # ambiguous-word bank (AMBIGUOUS_WORDS)
        "In what area are the failing dies?",
        "Describe the area where the dies fail.",
        "Name the area of this wafer with the failures.",
        "Where is the failing area on this map?",
    ],
    "type_location": [
        "Where is the {pattern} pattern?",
        "Where does the {pattern} appear on this wafer?",
        "Locate the {pattern} pattern.",
        "Which part of the wafer has the {pattern}?",
        "Is there a {pattern} pattern, and where?",
        "Where exactly is the {pattern}?",
        # wider bank (module docstring)
        "Where can I find the {pattern}?",
        "In which region is the {pattern}?",
        "Is the {pattern} present? Where?",
        "Describe where the {pattern} is.",
        "Where on this map is the {pattern} pattern?",
        "Which zone has the {pattern} pattern?",
        # ambiguous-word bank (AMBIGUOUS_WORDS)
        "In what area is the {pattern}?",
    ],
    "zone_extent": [
        "And what about the {zone}?",
        "What about the {zone}?",
        "How does the {zone} look?",
        "And the {zone}?",
        "How many dies fail at the {zone}?",
        "Check the {zone} too.",
        # wider bank (module docstring)
        "What do you see at the {zone}?",
        "How about the {zone}?",
        "Tell me about the {zone}.",
        "Is the {zone} affected?",
        "Are there failures at the {zone}?",
        "What happens at the {zone}?",
    ],
    "count": [
        "How many dies fail?",
        "How many failing dies are there?",
        "Count the failing dies.",
        "What is the number of bad dies on this wafer?",
        "How many dies are defective?",
        "How many dies failed the test?",
        "Give me the failing die count.",
        # wider bank (module docstring)
        "How many dies on this map fail?",
        "What is the failing die count on this wafer?",
        "How many bad dies does this map have?",
        "Count the bad dies on this wafer map.",
        "How many dies are failing on this wafer?",
        "How many of the dies fail on this map?",
        "Give the count of defective dies.",
        "How many dies did not pass?",
        "What is the count of failing dies?",
        "How many fails are on this map?",
        "Tell me how many dies fail.",
        "What number of dies failed on this wafer?",
    ],
    "yield": [
        "What is the yield of this wafer?",
        "What is the die yield?",
        "What percentage of dies are good?",
        "Compute the wafer yield.",
        "How good is the yield?",
        "What yield does this map have?",
        "Tell me the yield in percent.",
        # wider bank (module docstring)
        "What is the yield on this map?",
        "How many percent of the dies pass?",
        "What share of the dies is good on this wafer?",
        "Give me the yield of this wafer map.",
        "What is the yield of good dies?",
        "What percentage of dies passed the test?",
        "Calculate the yield for this wafer.",
        "What is the wafer yield in percent?",
        "Which yield does this wafer reach?",
        "How many dies are good, in percent?",
        "Tell me the yield of this map.",
        "How much yield does this map have?",
    ],
    "area": [
        "How much of the wafer area is affected?",
        "What fraction of the wafer fails?",
        "How large is the failing area?",
        "What share of the wafer is covered by failures?",
        "How big is the affected area in percent?",
        "What percentage of the wafer area fails?",
        # wider bank (module docstring)
        "What fraction of the wafer area fails on this map?",
        "How much of this map is failing?",
        "What percentage of this wafer is affected?",
        "How much of the wafer do the failures cover?",
        "What part of the wafer area is bad?",
        "Give the affected area in percent.",
        "How large is the affected share of this wafer?",
        "What area fraction do the defects cover?",
        "How much area is lost to failures?",
        "Which share of the map fails?",
        "Tell me the failing area in percent.",
        "How much of the area is covered by failing dies?",
    ],
    "cause": [
        "What could cause this?",
        "What are the likely causes?",
        "What usually causes this pattern?",
        "Which root causes are typical for this?",
        "Why would a wafer look like this?",
        "What process problem leads to this pattern?",
        "What is the probable root cause?",
        # wider bank (module docstring)
        "What causes this defect pattern?",
        "What is the root cause of this map?",
        "Which process step is likely responsible?",
        "What are typical causes of this pattern?",
        "What went wrong in the process?",
        "Explain the likely root cause.",
        "What is the origin of this pattern?",
        "What could have produced this pattern?",
        "Which equipment problem causes this?",
        "What is likely responsible for these failures?",
        "What creates a pattern like this?",
        "Why do the dies fail like this?",
        # ambiguous-word bank (AMBIGUOUS_WORDS)
        "Where in the process does this pattern start?",
        "Where should we look for the root cause?",
        "Where along the line could this defect have been introduced?",
        "Which process problems lead to this kind of map?",
        "What kind of process problem causes this?",
    ],
    "adjustment": [
        "What should we adjust in the process?",
        "What actions do you recommend?",
        "How should the process be corrected?",
        "What should engineering check?",
        "What process adjustment would help?",
        "Which steps should we fix?",
        "What should we do about it?",
        # wider bank (module docstring)
        "How do we prevent this pattern?",
        "What should the process team change?",
        "Which process parameters should we change?",
        "How can we avoid this defect?",
        "What fix do you propose?",
        "What would you change in the process?",
        "Which actions would remove this pattern?",
        "What should we correct?",
        "Recommend a process change.",
        "What corrections are needed?",
        "How can this be fixed?",
        "What steps would prevent it next time?",
    ],
    "severity": [
        "How severe is this?",
        "What is the severity and disposition?",
        "Should this wafer be scrapped or released?",
        "How serious is this defect?",
        "What disposition do you recommend?",
        "Rate the severity of this wafer.",
        "How bad is it?",
        # wider bank (module docstring)
        "Is this wafer good enough to ship?",
        "How severe is the damage on this map?",
        "Should we scrap this wafer?",
        "What severity would you assign?",
        "Is this wafer acceptable?",
        "How serious is this map?",
        "Can this wafer be released?",
        "What is the disposition for this wafer?",
        "How bad is this wafer map?",
        "Is this wafer usable?",
        "Give the severity of this defect.",
        "Should this wafer go on to assembly?",
    ],
    "why_severity": [
        "Why?",
        "Why that severity?",
        "Why is that?",
        "Can you explain?",
        "What is the reason?",
        "Why so?",
        # wider bank (module docstring)
        "What makes it that severe?",
        "Explain why.",
        "How do you know?",
        "What is that based on?",
        "Why that disposition?",
    ],
    "batch": [
        "Do other wafers of the same lot show this?",
        "Is this defect shared across the lot?",
        "How many wafers in this lot have the same defect?",
        "Compare this wafer with the rest of its lot.",
        "Is this a lot-wide problem?",
        "Does the batch show the same pattern?",
        "What about the other wafers in this lot?",
        # wider bank (module docstring)
        "Are other wafers in the lot affected?",
        "Does the whole lot have this problem?",
        "Is this pattern seen on other wafers of the lot?",
        "How widespread is this in the lot?",
        "Is the lot affected beyond this wafer?",
        "Do the other wafers look the same?",
        "Is this specific to this wafer or the whole lot?",
        "How many other wafers in the lot fail this way?",
        "Is this an isolated wafer?",
        "Does this appear elsewhere in the lot?",
        "Do neighbouring wafers in the lot have it too?",
        "Is the problem limited to this wafer?",
    ],
}

HELDOUT = {
    "defect_type": ["Identify the failure signature on this map.",
                    "Which defect class fits this wafer best?",
                    "What failure mode does the bin map show?"],
    "why_type": ["What is your reasoning?", "Explain that classification."],
    "location": ["Which area of the wafer holds the fails?",
                 "Point out where the defects cluster.",
                 "Whereabouts are the bad dies?"],
    "type_location": ["Whereabouts is the {pattern} signature?",
                      "Show me where the {pattern} sits."],
    "zone_extent": ["Now look at the {zone}.", "Any fails near the {zone}?"],
    "count": ["What's the fail count?", "Tally the bad dies for me.",
              "How many dies were rejected?"],
    "yield": ["Report the yield of this map.", "What's the good-die percentage?",
              "How much yield is left?"],
    "area": ["What portion of the wafer surface is bad?", "Estimate the affected area share.",
             "How much of the area do the fails take up?"],
    "cause": ["Where does this kind of failure usually come from?",
              "Suggest root causes for this map.", "What might be behind this?"],
    "adjustment": ["How do we fix this in the fab?", "Suggest corrective actions.",
                   "Which tool settings should be revisited?"],
    "severity": ["Is this wafer a keeper?", "Give a severity rating and disposition.",
                 "How critical is this map?"],
    "why_severity": ["What is the rationale?", "Justify that rating."],
    "batch": ["Is the rest of the lot affected as well?",
              "Are sister wafers showing the same thing?",
              "Check for a lot-level correlation."],
}

ZONE_WORDS = {"center": "center", "middle": "middle ring", "edge": "edge"}

# Neutral frames around a training question (qa/augment.py `frame_questions`): "{q}" is the
# question as written, "{lc}" the same with its first letter in lower case. They add words that
# say nothing about what is asked, in every kind's questions alike, so that words like "this
# map" or "wafer" stop being cues for one kind ("What yield does this map have?"). They use no
# word that only the held-out phrasings use (tests/test_qa_augment.py checks it), so the
# held-out phrasings stay unseen.
FRAMES = [
    "Quick question: {q}",
    "Next question. {q}",
    "Please answer this: {q}",
    "About this wafer map: {q}",
    "I have one more question. {q}",
    "Based on the image, {lc}",
    "For this wafer, {lc}",
    "Given this map, {lc}",
    "{q} Please be brief.",
    "{q} Thanks.",
    "{q} Answer in one sentence.",
    "{q} I need this for my notes.",
]

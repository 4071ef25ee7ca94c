"""Build the prompt sets of ppsd-ray from the hand-written templates and fillers below.

Writes three JSON-lines files, one {"prompt": ..., "category": ...} object per line:

- heads_train.jsonl: prompts for training the early-exit heads by self-distillation,
- heads_val.jsonl: prompts for validating them, built only from held-out templates and
  fillers (same categories, same number of prompts per category),
- bench.jsonl: the fixed benchmark suite, 12 code, 12 math and 12 chat prompts.

The random seed is fixed, so re-running the script reproduces the files byte for byte:

    python -m ppsd_ray.data.build_prompts              # writes next to this script
    python -m ppsd_ray.data.build_prompts --out DIR    # writes into DIR
"""

import argparse
import json
import random
from itertools import product
from pathlib import Path

SEED = 1234
TRAIN_PER_CATEGORY = 110
VAL_PER_CATEGORY = 20
HERE = Path(__file__).resolve().parent


def grid(**slots):
    """All combinations of the slot values, as dicts: grid(a=[1, 2], b="x") -> [{a: 1, b: "x"}, ...]."""
    return [dict(zip(slots, values)) for values in product(*slots.values())]


def fill(templates, rows):
    return [template.format(**row) for template in templates for row in rows]


# Every filler and template list below is split into "train" and "val" parts that share
# nothing, so validation prompts are genuinely held out.

# --- code ---------------------------------------------------------------------------

CODE_LANGUAGES = ["Python", "JavaScript"]

CODE_TEMPLATES = {
    "train": [
        "Write a {language} function that {task}. Explain how it works step by step.",
        "Can you show me how to write a {language} function that {task}? Please include a couple of examples.",
        "I need a {language} function that {task}. Write it with comments and explain any edge cases.",
        "Implement a function in {language} that {task}, and describe its time complexity.",
    ],
    "val": [
        "Show me a clean {language} solution for a function that {task}, then walk through a test case by hand.",
        "How would you write a function in {language} that {task}? Give the code and explain your design choices.",
    ],
}

CODE_TASKS = {
    "train": [
        "checks whether a string is a palindrome",
        "returns the n-th Fibonacci number",
        "counts how many times each word appears in a text",
        "removes duplicate items from a list while keeping their order",
        "merges two sorted lists into one sorted list",
        "converts a temperature from Celsius to Fahrenheit",
        "finds the largest and the smallest number in a list",
        "checks whether a number is prime",
        "reverses the order of the words in a sentence",
        "computes the factorial of a number",
        "flattens a nested list",
        "checks whether a string looks like a valid email address",
        "groups a list of words by their first letter",
        "calculates the average of a list of numbers, ignoring missing values",
        "finds the most common element in a list",
        "checks whether two strings are anagrams of each other",
        "converts a Roman numeral to an integer",
        "performs a binary search on a sorted list",
        "splits a list into chunks of a given size",
        "counts the vowels in a string",
        "returns the second largest number in a list",
        "capitalizes the first letter of every word in a sentence",
        "computes the running total of a list of numbers",
        "checks whether the brackets in a string are balanced",
        "converts a number of seconds into hours, minutes and seconds",
        "finds all pairs of numbers in a list that add up to a target",
        "rotates a list by k positions",
        "sorts a list of records by a given field",
        "computes the greatest common divisor of two numbers",
        "generates all prime numbers below a given limit",
    ],
    "val": [
        "finds the longest common prefix of a list of strings",
        "compresses a string using run-length encoding",
        "transposes a matrix given as a list of rows",
        "checks whether a year is a leap year",
        "converts a string from snake_case to camelCase",
        "finds the missing number in a list that should contain 1 to n",
        "computes the sum of the digits of an integer",
        "removes all punctuation from a sentence",
        "returns the elements that two lists have in common",
        "counts the islands in a grid of 0s and 1s",
    ],
}


def code_prompts(split):
    return fill(CODE_TEMPLATES[split], grid(language=CODE_LANGUAGES, task=CODE_TASKS[split]))


# --- math ---------------------------------------------------------------------------

MATH_TEMPLATES = {
    "train": [
        "Solve this step by step: {problem}",
        "{problem} Show your work and explain each step.",
        "Can you walk me through this problem? {problem}",
    ],
    "val": [
        "Work out the answer carefully, explaining your reasoning as you go: {problem}",
        "Here is a word problem for you. {problem} Please give a step-by-step solution.",
    ],
}

# Word problems with number slots; each slot is filled with a random value from its range.
MATH_PROBLEMS = {
    "train": [
        ("A train travels {a} kilometres in {b} hours. What is its average speed?",
         dict(a=range(120, 601, 10), b=range(2, 7))),
        ("A shirt costs ${a}. It is on sale for {b}% off. What is the sale price?",
         dict(a=range(20, 91), b=range(10, 41, 5))),
        ("What is the sum of all whole numbers from 1 to {a}?",
         dict(a=range(20, 201))),
        ("Find the area and the perimeter of a rectangle that is {a} cm long and {b} cm wide.",
         dict(a=range(8, 40), b=range(3, 20))),
        ("Solve the equation {a}x + {b} = {c} for x.",
         dict(a=range(2, 10), b=range(3, 31), c=range(40, 121))),
        ("A recipe needs {a} grams of flour for {b} people. How much flour is needed for {c} people?",
         dict(a=range(200, 601, 50), b=range(2, 7), c=range(7, 13))),
        ("What is {a}% of {b}?",
         dict(a=range(5, 61, 5), b=range(40, 901, 20))),
        ("Find the greatest common divisor and the least common multiple of {a} and {b}.",
         dict(a=range(12, 61), b=range(18, 91))),
        ("A tank holds {a} litres of water and drains at {b} litres per minute. How long does it take to empty?",
         dict(a=range(200, 1001, 50), b=range(4, 26))),
        ("Anna is {a} years old and her father is {b} years older than her. "
         "In how many years will the sum of their ages be {c}?",
         dict(a=range(8, 16), b=range(24, 36), c=range(80, 101))),
        ("The angles of a triangle are in the ratio {a}:{b}:{c}. Find the size of each angle.",
         dict(a=range(1, 6), b=range(2, 7), c=range(3, 9))),
        ("A savings account pays {a}% simple interest per year. How much interest does ${b} earn in {c} years?",
         dict(a=range(2, 7), b=range(500, 5001, 250), c=range(2, 11))),
        ("What is the probability of rolling a total of {a} with two fair six-sided dice?",
         dict(a=range(2, 13))),
        ("A car uses {a} litres of fuel per 100 kilometres. How much fuel does it need for a trip of {b} kilometres?",
         dict(a=range(5, 11), b=range(150, 801, 50))),
    ],
    "val": [
        ("A cyclist rides at {a} km/h for {b} hours and then at {c} km/h for one more hour. "
         "What is the total distance, and what is the average speed?",
         dict(a=range(12, 25), b=range(2, 5), c=range(8, 16))),
        ("In a class of {a} students, {b} passed the exam. What percentage of the class passed?",
         dict(a=range(20, 41), b=range(12, 20))),
        ("Find the area and the circumference of a circle with a radius of {a} cm. Use 3.14 for pi.",
         dict(a=range(2, 21))),
        ("Solve the system of equations x + y = {a} and x - y = {b}.",
         dict(a=range(20, 61, 2), b=range(2, 19, 2))),
        ("One painter can paint a fence in {a} hours and another can paint it in {b} hours. "
         "How long does it take them working together?",
         dict(a=range(3, 9), b=range(4, 13))),
    ],
}
DRAWS_PER_PROBLEM = 4


def math_prompts(split):
    rng = random.Random(SEED)
    problems = [
        text.format(**{slot: rng.choice(values) for slot, values in slots.items()})
        for text, slots in MATH_PROBLEMS[split]
        for _ in range(DRAWS_PER_PROBLEM)
    ]
    return fill(MATH_TEMPLATES[split], grid(problem=problems))


def held_out_traffic(n: int, exclude: set[str], seed: int = 7) -> list[dict]:
    """n code and maths prompts from the held-out (val) templates and fillers, none in `exclude`
    (the validation set): each held-out code prompt twice, then maths word problems with numbers
    drawn afresh, all distinct. Traffic the shipped heads never trained on (bench/online_learning.py)."""
    rng = random.Random(seed)
    code = [p for p in sorted(set(code_prompts("val"))) if p not in exclude]
    rows = [{"prompt": p, "category": "code"} for p in code for _ in range(2)][:n]
    seen = set(exclude)
    while len(rows) < n:
        text, slots = rng.choice(MATH_PROBLEMS["val"])
        prompt = rng.choice(MATH_TEMPLATES["val"]).format(
            problem=text.format(**{slot: rng.choice(values) for slot, values in slots.items()}))
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "category": "math"})
    rng.shuffle(rows)
    return rows


# --- chat ---------------------------------------------------------------------------

CHAT_TEMPLATES = {
    "train": [
        "I want to {goal}. Where should I start?",
        "Can you help me figure out how to {goal}? I'd love some practical tips.",
        "What's the best way to {goal}? Please give me a few concrete steps.",
        "What mistakes should I avoid when I try to {goal}, and what should I do instead?",
    ],
    "val": [
        "I've been struggling to {goal} lately. Do you have any advice?",
        "What would you recommend if I want to {goal}? Please be specific.",
    ],
}

CHAT_GOALS = {
    "train": [
        "get better sleep",
        "start running regularly",
        "cook healthy meals on a tight budget",
        "prepare for a job interview",
        "stay in touch with old friends",
        "read more books",
        "keep my home tidy",
        "start a vegetable garden",
        "spend less time on my phone",
        "save money for a holiday",
        "get along better with my roommate",
        "learn to play the guitar",
        "feel more confident when speaking in meetings",
        "plan my first trip abroad",
        "eat more vegetables",
        "stop procrastinating",
        "train my new puppy",
        "decide between two job offers",
        "make my mornings less rushed",
        "organize my digital photos",
        "become a better listener",
        "settle into a new city",
        "plan a surprise party for my partner",
        "balance work and evening classes",
        "learn to draw",
        "write my first short story",
        "get involved in volunteering",
        "deal with a difficult coworker",
        "learn the basics of investing",
        "keep a conversation going with new people",
    ],
    "val": [
        "motivate myself to clean out the garage",
        "learn to swim as an adult",
        "make a good first impression at a new job",
        "cut down on how much coffee I drink",
        "keep a journal every day",
        "host a dinner party for the first time",
        "get my teenager interested in cooking",
        "choose a laptop for university",
        "be more patient with my kids",
        "take up birdwatching",
    ],
}


def chat_prompts(split):
    return fill(CHAT_TEMPLATES[split], grid(goal=CHAT_GOALS[split]))


# --- summary and rewrite (share the passages) -------------------------------------------

PASSAGES = {
    "train": [
        "Sourdough bread is made with a starter, a mixture of flour and water that has been colonized by "
        "wild yeast and bacteria. The starter has to be fed regularly with fresh flour and water to stay "
        "active. Because fermentation is slow, sourdough takes longer to rise than bread made with "
        "commercial yeast, but many people find its tangy flavour worth the wait.",
        "In Git, a branch is simply a movable pointer to a commit. When you create a branch and make new "
        "commits on it, the pointer moves forward while the main branch stays where it was. This makes it "
        "cheap to try out ideas in isolation and merge them back only when they work.",
        "Honeybees tell each other where to find food with a behaviour known as the waggle dance. The angle "
        "of the dance shows the direction of the flowers relative to the sun, and the length of the waggle "
        "run indicates the distance. Researchers have decoded these dances to map where colonies forage.",
        "Many companies adopted remote work during the pandemic and kept it afterwards. Employees often "
        "report saving time and money on commuting, while managers worry about collaboration and about "
        "mentoring new staff. As a result, a growing number of firms now use a hybrid model with a few "
        "office days each week.",
        "The town library recently extended its opening hours on weekday evenings. It also launched a free "
        "program that lends out tools such as drills, ladders and sewing machines. Staff say the tool "
        "library has been especially popular with young families and with students who rent small "
        "apartments.",
        "A password manager stores all of your passwords in an encrypted vault protected by a single master "
        "password. Because it can generate a long random password for every site, a leak at one website no "
        "longer puts your other accounts at risk. The main drawback is that the master password must be "
        "strong and must never be forgotten.",
        "Coral reefs cover less than one percent of the ocean floor but support about a quarter of all "
        "marine species. When the water becomes too warm, corals expel the algae living in their tissues "
        "and turn white, a process called bleaching. If temperatures do not return to normal, the bleached "
        "corals can starve and die.",
        "Electric cars have fewer moving parts than petrol cars, which usually means less maintenance. "
        "Their batteries, however, are heavy and expensive, and charging takes longer than filling a tank. "
        "Better battery chemistry and a growing network of fast chargers are steadily reducing these "
        "disadvantages.",
        "Coffee beans are actually the seeds of a fruit called the coffee cherry. After the harvest, the "
        "seeds are dried, roasted and ground. Roasting develops most of the flavour: light roasts keep more "
        "of the bean's acidity, while dark roasts taste more bitter and smoky.",
        "Unit tests check small pieces of code, such as a single function, in isolation. They run quickly "
        "and can be executed every time the code changes, which helps catch mistakes early. A good test "
        "suite also serves as documentation, showing how the code is meant to be used.",
        "The marathon distance of 42.195 kilometres was fixed after the 1908 London Olympics, where the "
        "course was extended so that the race could finish in front of the royal box. Before that, marathon "
        "distances varied from race to race. The name comes from the legend of a Greek messenger who ran "
        "from Marathon to Athens.",
        "Composting turns kitchen scraps and garden waste into a rich soil conditioner. A healthy compost "
        "pile needs a balance of green materials, like vegetable peelings, and brown materials, like dry "
        "leaves or cardboard. Turning the pile every week or two adds oxygen and speeds up the process.",
        "Bright screens in the evening can delay the release of melatonin, the hormone that helps us feel "
        "sleepy. Many sleep experts recommend putting phones and laptops away an hour before bed. Reading a "
        "paper book or listening to quiet music are common alternatives.",
        "Cloud computing lets companies rent servers and storage instead of buying and maintaining their "
        "own hardware. They pay only for what they use and can add capacity within minutes when demand "
        "grows. The trade-off is a dependence on the provider and costs that can rise quickly if usage is "
        "not monitored.",
        "Iceland sits on the Mid-Atlantic Ridge, where two tectonic plates are slowly moving apart. This is "
        "why the island has so many volcanoes and hot springs. Much of the country's heating and "
        "electricity comes from geothermal energy.",
        "A simple way to start budgeting is the 50/30/20 rule. Half of your income goes to needs such as "
        "rent and groceries, thirty percent to wants, and twenty percent to savings or paying off debt. The "
        "rule does not suit everyone, but it gives a clear starting point.",
        "Spreadsheets were among the first programs that made personal computers useful for businesses. "
        "VisiCalc, released in 1979, let users change one number and instantly see every total that "
        "depended on it update. Today spreadsheets are used for everything from household budgets to "
        "scientific data analysis.",
        "Residents of Elm Street turned an empty lot into a community garden last spring. Each household "
        "tends a small plot, and surplus vegetables are donated to a local food bank. The project has also "
        "brought together neighbours who had never spoken to each other before.",
        "Octopuses are remarkably intelligent animals. They can solve puzzles, open jars and even escape "
        "from aquarium tanks. Most of their neurons are located in their arms, which can react to touch and "
        "taste without waiting for instructions from the brain.",
        "When you visit a website over HTTPS, your browser and the server agree on encryption keys before "
        "any page content is sent. This prevents people on the same network from reading or changing the "
        "data. The padlock icon shows that the connection is encrypted, but it does not guarantee that the "
        "site itself is trustworthy.",
        "Walking for thirty minutes a day is one of the simplest ways to improve your health. Studies link "
        "regular walking to lower blood pressure, better mood and improved sleep. Unlike many sports, it "
        "needs no special equipment and fits easily into a commute or a lunch break.",
        "The printing press, developed by Johannes Gutenberg around 1440, made books far cheaper to "
        "produce. Ideas could spread faster and reach many more people than when every copy had to be "
        "written by hand. Historians see it as one of the key inventions behind the Renaissance and the "
        "Reformation.",
        "Not all plastics can be recycled in the same way. The small number inside the recycling symbol "
        "identifies the type of plastic, and many local programs accept only a few of these types. Rinsing "
        "containers before recycling them helps prevent whole batches from being contaminated.",
        "A backup is only useful if it can be restored. Many teams discover too late that their backups "
        "were incomplete or corrupted. Regularly practising a full restore on a test system is the best "
        "way to be sure the data can actually be recovered.",
    ],
    "val": [
        "Every autumn, Arctic terns fly from the Arctic to Antarctica, and they return the following "
        "spring. Over a lifetime, a single bird may travel a distance equal to several trips to the Moon "
        "and back. Scientists follow them with tiny devices that record light levels to estimate their "
        "position.",
        "Our city added twenty kilometres of protected bike lanes last year. Since then, the number of "
        "people cycling to work has nearly doubled. Shop owners on the new routes were worried about losing "
        "parking, but most report that their sales have stayed the same or gone up.",
        "Spaced repetition is a study technique in which you review material at gradually increasing "
        "intervals. Reviewing something just before you would forget it strengthens memory more than "
        "cramming everything at once. Flashcard apps use this idea to decide which cards you see each day.",
        "Code review means asking a colleague to read your changes before they are merged. Reviewers often "
        "spot bugs, unclear names or missing tests that the author overlooked. Just as importantly, reviews "
        "spread knowledge of the codebase across the team.",
        "Kimchi is a traditional Korean dish made by fermenting vegetables, most often napa cabbage and "
        "radish, with chilli, garlic and ginger. Lactic acid bacteria turn sugars into acid, which preserves "
        "the vegetables and gives kimchi its sour taste. Families traditionally prepared large batches in "
        "late autumn to last through the winter.",
        "Before satellite navigation, lighthouses were essential for ships sailing along dangerous coasts. "
        "Each lighthouse had its own pattern of flashes, so sailors could identify it at night. Today most "
        "are automated, and many of the old keepers' houses have become museums or holiday homes.",
        "The price of solar panels has fallen dramatically over the past decade. As a result, solar is now "
        "one of the cheapest ways to generate electricity in many countries. The main challenge is that "
        "panels produce power only when the sun shines, so storage and power grids have to adapt.",
        "The science museum has opened a new hands-on exhibition about sound. Visitors can see their voices "
        "turned into waves on a screen, play giant instruments and test how different materials absorb "
        "noise. The exhibition is aimed at children but has proved popular with adults too.",
    ],
}

SUMMARY_TEMPLATES = {
    "train": [
        "Summarize the following passage in two or three sentences, then explain its main point in your "
        "own words.\n\n{passage}",
        "Read this text and write a short summary followed by a list of its key points.\n\n{passage}",
        "Here is a short passage:\n\n{passage}\n\nWhat is it about? Give a summary and explain why the "
        "topic matters.",
        "Give me a one-line summary of this passage, and then a longer summary for someone who wants more "
        "detail.\n\n{passage}",
        "Summarize this for a busy colleague and mention anything they should pay attention to:\n\n{passage}",
    ],
    "val": [
        "Condense the passage below into a brief summary, and then describe what questions a curious "
        "reader might ask next.\n\n{passage}",
        "Passage:\n\n{passage}\n\nPlease write a one-paragraph summary and list the three most important "
        "facts.",
        "What are the main ideas of this text? Summarize them and say what the author seems to want the "
        "reader to take away.\n\n{passage}",
    ],
}

REWRITE_TEMPLATES = {
    "train": [
        "Rewrite the following passage so that a ten-year-old could understand it:\n\n{passage}",
        "Rewrite this passage in a more formal, professional tone:\n\n{passage}",
        "Turn this passage into a friendly email to a colleague:\n\n{passage}",
        "Rewrite the passage below as an engaging opening for a blog post, expanding it to two "
        "paragraphs:\n\n{passage}",
        "Rewrite this text as a short story told in the first person:\n\n{passage}",
    ],
    "val": [
        "Rewrite the following passage as a short news article with a headline:\n\n{passage}",
        "Make this passage more lively and conversational, as if you were explaining it to a friend over "
        "coffee:\n\n{passage}",
        "Rewrite the text below as a short speech for a school assembly:\n\n{passage}",
    ],
}


def summary_prompts(split):
    return fill(SUMMARY_TEMPLATES[split], grid(passage=PASSAGES[split]))


def rewrite_prompts(split):
    return fill(REWRITE_TEMPLATES[split], grid(passage=PASSAGES[split]))


# --- translation -----------------------------------------------------------------------

TARGET_LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese"]

TO_ENGLISH_TEMPLATES = {
    "train": [
        'Translate this {language} sentence into English, then explain its grammar and any idioms it uses: "{text}"',
        'What does "{text}" mean? It is {language}. Give an English translation and go through the '
        "sentence word by word.",
        'I found this sentence in a {language} textbook: "{text}" Please translate it into English and '
        "explain how it is built.",
    ],
    "val": [
        'Please translate this {language} text into English and comment on anything a learner might find '
        'tricky: "{text}"',
    ],
}

FOREIGN_SENTENCES = {
    "train": [
        ("French", "Le marché du samedi matin est le meilleur endroit pour acheter des légumes frais."),
        ("French", "Nous avons raté le dernier train, alors nous avons dormi dans un petit hôtel près de la gare."),
        ("French", "Mon grand-père m'a appris à jouer aux échecs quand j'avais sept ans."),
        ("French", "Il faut arroser les tomates tous les soirs pendant l'été."),
        ("Spanish", "Mañana vamos a visitar a mis abuelos, que viven en un pueblo cerca de la costa."),
        ("Spanish", "La biblioteca cierra a las ocho, así que tenemos que darnos prisa."),
        ("Spanish", "Aprender un idioma nuevo requiere paciencia y mucha práctica."),
        ("Spanish", "El perro de mi vecina ladra cada vez que pasa el cartero."),
        ("German", "Am Wochenende fahren wir mit dem Fahrrad an den See."),
        ("German", "Ich habe vergessen, das Fenster zu schließen, bevor es zu regnen begann."),
        ("German", "Der Zug hatte zwanzig Minuten Verspätung, deshalb kam ich zu spät zur Arbeit."),
        ("German", "Meine Schwester arbeitet als Ärztin in einem Krankenhaus in Hamburg."),
        ("Italian", "Ogni domenica la mia famiglia pranza insieme a casa della nonna."),
        ("Italian", "Il museo è chiuso il lunedì, ma il martedì apre presto la mattina."),
        ("Italian", "Ho comprato un libro di ricette e stasera provo a fare il risotto."),
        ("Portuguese", "Eu gosto de tomar café na varanda enquanto leio o jornal."),
        ("Portuguese", "A reunião foi adiada para a próxima semana por causa da chuva."),
    ],
    "val": [
        ("French", "Les enfants ont construit un château de sable pendant que leurs parents lisaient sur la plage."),
        ("Spanish", "Si tienes tiempo esta tarde, podemos preparar juntos una tortilla de patatas."),
        ("German", "Nach dem Abendessen gehen wir oft noch eine Runde im Park spazieren."),
        ("Italian", "La mia amica ha imparato a suonare la chitarra guardando dei video su internet."),
        ("Portuguese", "O ônibus estava tão cheio que decidimos ir a pé até o centro."),
    ],
}

FROM_ENGLISH_TEMPLATES = {
    "train": [
        'Translate the following sentence into {language} and explain your word choices: "{text}"',
        'How would you say "{text}" in {language}? Give the translation and a short explanation of the grammar.',
    ],
    "val": [
        'Can you put this into {language} for me and explain the main grammar points? "{text}"',
    ],
}

ENGLISH_SENTENCES = {
    "train": [
        "The meeting has been moved to Thursday afternoon.",
        "Could you recommend a good restaurant near the station?",
        "I have been learning to play the piano for two years.",
        "Please remember to turn off the lights when you leave.",
        "The weather forecast says it will snow tomorrow.",
        "We are planning a trip to the mountains next summer.",
        "My laptop stopped working, so I took it to a repair shop.",
        "How long does it take to walk to the museum?",
        "She reads a chapter of her book every night before bed.",
        "The children are playing football in the park.",
    ],
    "val": [
        "I would like to book a table for four people at seven o'clock.",
        "Our neighbours painted their front door bright yellow.",
        "Do you know where I can buy a train ticket?",
        "He forgot his umbrella and got completely wet on the way home.",
    ],
}


def translation_prompts(split):
    foreign = [dict(language=language, text=text) for language, text in FOREIGN_SENTENCES[split]]
    english = grid(language=TARGET_LANGUAGES, text=ENGLISH_SENTENCES[split])
    return fill(TO_ENGLISH_TEMPLATES[split], foreign) + fill(FROM_ENGLISH_TEMPLATES[split], english)


# --- list -----------------------------------------------------------------------------

LIST_TEMPLATES = {
    "train": [
        "List {n} {things}, with a short explanation for each.",
        "Give me {n} {things}. For each one, add a sentence or two of detail.",
    ],
    "val": [
        "Can you make a numbered list of {n} {things} and explain why each one made the list?",
        "What would be your top {n} {things}? Describe each one briefly.",
    ],
}

LIST_SIZES = {"train": [5, 7, 10], "val": [6, 8]}

LIST_THINGS = {
    "train": [
        "ways to save money on groceries",
        "tips for keeping houseplants alive",
        "classic novels worth reading",
        "healthy breakfast ideas",
        "ways to reduce stress at work",
        "board games for a family evening",
        "things to pack for a camping trip",
        "useful Python libraries for data analysis",
        "ideas for a rainy weekend",
        "habits that improve sleep",
        "questions to ask at the end of a job interview",
        "ways to make a small apartment feel bigger",
        "exercises you can do without any equipment",
        "tips for writing a clear email",
        "hobbies that are cheap to start",
        "ways to stay productive when working from home",
        "important inventions of the twentieth century",
        "ways to reduce household waste",
        "tips for learning a new language",
        "simple dinners for busy weeknights",
        "common mistakes new programmers make",
        "ways to stay motivated while studying",
        "ideas for a birthday party on a budget",
        "skills every home cook should know",
        "ways to keep your computer secure",
        "tips for surviving a long flight",
        "interesting cities to visit in Europe",
        "good habits for managing personal finances",
        "ways to make friends in a new city",
        "gift ideas for someone who loves reading",
    ],
    "val": [
        "ways to save energy at home",
        "tips for taking better photos with a phone",
        "vegetables that are easy to grow in a small garden",
        "ways to get better at public speaking",
        "indoor activities for kids on a rainy day",
        "tips for running a first marathon",
        "ways to declutter a wardrobe",
        "snacks to bring on a road trip",
        "tricks for remembering people's names",
        "things to check before buying a used car",
    ],
}


def list_prompts(split):
    return fill(LIST_TEMPLATES[split], grid(n=LIST_SIZES[split], things=LIST_THINGS[split]))


# --- explain --------------------------------------------------------------------------

EXPLAIN_TEMPLATES = {
    "train": [
        "Explain {concept} in simple terms and give an everyday example.",
        "How does {concept} work? Please go into some detail.",
        "I've never really understood {concept}. Can you walk me through it?",
        "What is {concept}, and why does it matter?",
    ],
    "val": [
        "Give me a beginner-friendly explanation of {concept}, including a short analogy.",
        "Could you describe {concept} as if you were teaching a high school class?",
    ],
}

EXPLAIN_CONCEPTS = {
    "train": [
        "photosynthesis",
        "compound interest",
        "the greenhouse effect",
        "inflation",
        "machine learning",
        "recursion in programming",
        "the water cycle",
        "supply and demand",
        "the immune system",
        "public-key encryption",
        "a credit score",
        "natural selection",
        "a hash table",
        "plate tectonics",
        "the stock market",
        "GPS navigation",
        "a blockchain",
        "the placebo effect",
        "version control with Git",
        "an electric motor",
        "the scientific method",
        "a neural network",
        "opportunity cost",
        "a black hole",
        "the domain name system",
        "a solar panel",
        "vaccination",
        "a refrigerator",
        "caching in web browsers",
        "a heat pump",
    ],
    "val": [
        "nuclear fusion",
        "the Doppler effect",
        "a mortgage",
        "garbage collection in programming languages",
        "ocean tides",
        "antibiotic resistance",
        "a database index",
        "the circadian rhythm",
        "currency exchange rates",
        "a wind turbine",
    ],
}


def explain_prompts(split):
    return fill(EXPLAIN_TEMPLATES[split], grid(concept=EXPLAIN_CONCEPTS[split]))


CATEGORIES = {
    "code": code_prompts,
    "math": math_prompts,
    "chat": chat_prompts,
    "summary": summary_prompts,
    "translation": translation_prompts,
    "list": list_prompts,
    "explain": explain_prompts,
    "rewrite": rewrite_prompts,
}

# --- benchmark suite (hand-written, not generated) -----------------------------------------

BENCH = {
    "code": [
        "Write a Python function that reads a CSV file of sales records and returns the total revenue per "
        "product. Explain how the code works and how it handles malformed rows.",
        "Write a Python class that implements a least-recently-used (LRU) cache with get and put methods. "
        "Explain the data structures you chose and the time complexity of each operation.",
        "Write a Python function that checks whether a filled-in Sudoku board is valid, and explain your "
        "approach step by step.",
        "Write a JavaScript function that debounces another function, and explain in detail when and why "
        "debouncing is useful.",
        "Write a Python generator that yields the lines of a large log file that contain a given keyword, "
        "and explain why a generator is a good fit for this task.",
        "Implement breadth-first search on a graph stored as an adjacency list in Python. Explain how it "
        "works and show how to use it to find the shortest path between two nodes.",
        "Write a Python function that converts an integer into English words, for example 342 into "
        "'three hundred forty-two'. Explain how your solution handles numbers of different sizes.",
        "Write a small command-line to-do list program in Python that can add, list and remove tasks "
        "stored in a JSON file. Explain each part of the code.",
        "Write a Python function that checks a password against a set of rules (minimum length, digits, "
        "uppercase letters, symbols) and returns the list of rules it breaks. Explain your design.",
        "Explain the difference between a list and a tuple in Python, then write a short program that "
        "shows when you would use each one.",
        "Write a Python decorator that measures how long a function takes to run and prints the result. "
        "Explain how decorators work along the way.",
        "Write a SQL query that finds the five customers with the highest total order value, given a "
        "customers table and an orders table, and explain each clause of the query.",
    ],
    "math": [
        "Solve step by step: a bakery sells muffins for $2.50 each and cookies for $1.20 each. On Monday it "
        "sold 84 items and took in $155.40. How many muffins and how many cookies did it sell?",
        "Solve the quadratic equation x^2 - 7x + 10 = 0 step by step, once by factoring and once with the "
        "quadratic formula, and explain both methods.",
        "Solve step by step: a 10-metre ladder leans against a wall with its foot 6 metres from the wall. "
        "How high up the wall does it reach, and what angle does it make with the ground?",
        "Solve step by step: if you invest $5,000 at 4% interest compounded annually, how much will you "
        "have after 10 years? Explain the compound interest formula as you go.",
        "Solve step by step: two trains leave cities 450 km apart at the same time and travel towards each "
        "other at 80 km/h and 70 km/h. When and where do they meet?",
        "Solve step by step: what is the probability of drawing two aces in a row from a standard 52-card "
        "deck without replacement? Compare it with the probability when the first card is put back.",
        "Prove that the square root of 2 is irrational, explaining each step of the argument in plain "
        "language.",
        "Solve step by step: find the derivative of f(x) = 3x^3 - 5x^2 + 2x - 8 and use it to find the "
        "points where the graph of f has a horizontal tangent.",
        "Solve step by step: a rectangular garden has a perimeter of 56 metres, and its length is 4 metres "
        "more than its width. Find its dimensions and its area.",
        "Explain step by step how to convert the decimal number 156 to binary and to hexadecimal, then "
        "check both answers by converting them back.",
        "Solve step by step: the average of five numbers is 18. When one of the numbers is removed, the "
        "average of the remaining four is 16. Which number was removed?",
        "A store raises the price of a jacket by 20% and later offers 20% off the new price. Is the final "
        "price the same as the original one? Solve step by step with an example and explain why.",
    ],
    "chat": [
        "I just moved to a new city where I don't know anyone. Can you give me a detailed plan for building "
        "a social life over the next few months?",
        "My first half marathon is twelve weeks away. Explain in detail how I should prepare for it.",
        "I'm thinking about switching careers from accounting to software development. What should I "
        "consider, and how would you suggest I go about it?",
        "Explain in detail what happens between typing a web address into a browser and seeing the page, "
        "for someone with no technical background.",
        "My elderly parents want to start using a smartphone. How can I teach them patiently and make it "
        "easy for them? Please give detailed advice.",
        "What are the pros and cons of renting versus buying a home? Please discuss them in detail so I can "
        "decide what suits me.",
        "I have a week off work and a small budget. Can you help me plan a relaxing and interesting "
        "staycation, day by day?",
        "Explain in detail why sleep is so important for our health, and what happens in the body and the "
        "brain while we sleep.",
        "I keep starting new hobbies and giving them up after a couple of weeks. Why might that be "
        "happening, and what can I do about it?",
        "Can you describe in detail how to host a fun board game night for friends who have never played "
        "modern board games?",
        "Explain in detail how climate change affects everyday life, and what ordinary people can "
        "realistically do about it.",
        "I'm nervous about giving a toast at my best friend's wedding. Can you help me plan what to say and "
        "give me tips for delivering it well?",
    ],
}


def build_heads():
    """Sample the train and val head sets, the same number of prompts per category in each."""
    rng = random.Random(SEED)
    sets = {}
    for split, per_category in (("train", TRAIN_PER_CATEGORY), ("val", VAL_PER_CATEGORY)):
        rows = []
        for category, make_prompts in CATEGORIES.items():
            pool = sorted(set(make_prompts(split)))
            rows += [{"prompt": prompt, "category": category} for prompt in rng.sample(pool, per_category)]
        rng.shuffle(rows)
        sets[split] = rows
    return sets["train"], sets["val"]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(out_dir=HERE):
    train, val = build_heads()
    bench = [{"prompt": prompt, "category": category} for category, prompts in BENCH.items() for prompt in prompts]

    train_texts, val_texts, bench_texts = ({row["prompt"] for row in rows} for rows in (train, val, bench))
    assert len(bench_texts) == len(bench) == 36, "bench needs 36 distinct prompts"
    assert not train_texts & val_texts, "train and val share prompts"
    assert not bench_texts & (train_texts | val_texts), "bench shares prompts with the head sets"

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "heads_train.jsonl", train)
    write_jsonl(out_dir / "heads_val.jsonl", val)
    write_jsonl(out_dir / "bench.jsonl", bench)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE, help="output directory (default: next to this script)")
    main(parser.parse_args().out)

"""The ``builtin_tasks`` dataset source: instruction tasks with verifiable answers, generated here so
that the embedded default recipe runs offline.

Five families: arithmetic word problems, unit conversions, list manipulations, string
manipulations and factual look-ups from small tables below. Every ground-truth response is
written the way GPT-4 answers in Orca (restates the task, works through the steps, explains) and
ends with a final line ``Answer: X``; ``meta["answer"]`` holds X and ``meta["task"]`` the family
so that the held-out split can be scored by exact match. System messages are drawn from those
Orca uses (the paper's App. B, Table 5). Generation is seeded: the same params give the same
records byte for byte, and the first k records do not depend on ``n``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Literal

from pydantic import Field

from profuser import hookimpl
from profuser.components import BadRow, DatasetSource, Record, StrictModel
from profuser.errors import DataError

Family = Literal["arithmetic", "units", "lists", "strings", "facts"]
FAMILIES: tuple[str, ...] = ("arithmetic", "units", "lists", "strings", "facts")

# Orca's system messages (the empty one included): they ask for step-by-step, detailed or simple answers.
SYSTEM_MESSAGES = (
    "",
    ("You are an AI assistant. User will you give you a task. Your goal is to complete the task as faithfully as "
     "you can. While performing the task think step-by-step and justify your steps."),
    "You are a helpful assistant, who always provide explanation. Think like you are answering to a five year old.",
    "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.",
    ("You are an AI assistant that helps people find information. Provide a detailed answer so user don't need to "
     "search outside to understand the answer."),
    "You are an AI assistant that follows instruction extremely well. Help as much as you can.",
    "You are an AI assistant. Provide a detailed answer so user don't need to search outside to understand the answer.",
    ("User will you give you a task with some instruction. Your job is follow the instructions as faithfully as you "
     "can. While answering think step-by-step and justify your answer."),
    ("You are a teacher. Given a task, you explain in simple steps what the task is asking, any guidelines it "
     "provides and how to use those guidelines to find an answer."),
    ("You are an AI assistant that helps people find information. User will you give you a question. Your task is "
     "to answer as faithfully as you can. While answering think step-by-step and justify your answer."),
)

# A task: (key that must not repeat, instruction, explanation, short answer).
Task = tuple[tuple, str, str, str]


def fmt(x: float) -> str:
    """A number as a canonical short answer: no thousands separators, no trailing zeros."""
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.4f}".rstrip("0").rstrip(".")


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def steps(lines: list[str]) -> str:
    return "\n".join(f"Step {i}: {line}" for i, line in enumerate(lines, 1))


# --- arithmetic word problems ------------------------------------------------------------------

PEOPLE = (("Maria", "she", "her"), ("James", "he", "his"), ("Aisha", "she", "her"), ("Chen", "he", "his"),
          ("Lucas", "he", "his"), ("Priya", "she", "her"), ("Omar", "he", "his"), ("Sofia", "she", "her"),
          ("Noah", "he", "his"), ("Yuki", "she", "her"), ("Elena", "she", "her"), ("Kwame", "he", "his"))
ITEMS = (("notebook", "notebooks"), ("apple", "apples"), ("pen", "pens"), ("ticket", "tickets"),
         ("muffin", "muffins"), ("plant", "plants"), ("sticker", "stickers"), ("marble", "marbles"),
         ("card", "cards"), ("cookie", "cookies"))


def _shopping(rng: random.Random) -> Task:
    (name, he, _), (one, many) = rng.choice(PEOPLE), rng.choice(ITEMS)
    count, price = rng.randint(2, 9), rng.randint(2, 15)
    total = count * price
    bill = next(b for b in (10, 20, 50, 100, 200) if b > total)
    change = bill - total
    instruction = rng.choice((
        f"{name} buys {count} {many} that cost ${price} each and pays with a ${bill} bill. How much change does {he} get back, in dollars?",
        f"{count} {many} cost ${price} each. {name} pays for them with a ${bill} bill. How many dollars of change should {he} receive?",
    ))
    body = (f"We need the change {name} gets, which is the amount paid minus the total cost.\n\n" + steps([
        f"Find the total cost. Each {one} costs ${price} and there are {count} of them, so the total is {count} × ${price} = ${total}.",
        f"Subtract the cost from the amount paid: ${bill} − ${total} = ${change}.",
        f"Check: ${total} + ${change} = ${bill}, which matches the bill {name} paid with.",
    ]) + f"\n\nSo {name} gets ${change} back.")
    return ("shopping", count, price, bill), instruction, body, fmt(change)


def _sharing(rng: random.Random) -> Task:
    (name, _, his), (_, many) = rng.choice(PEOPLE), rng.choice(ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(3, 12)
    left = rng.randint(0, friends - 1)
    total = friends * each + left
    if rng.random() < 0.5:
        question, answer = "How many does each friend get?", each
        ending = f"Each friend gets {each} {many}" + (f" (and {left} are left over)." if left else ".")
    else:
        question, answer = f"How many {many} are left over?", left
        ending = f"{left} {many} are left over after each friend gets {each}."
    instruction = f"{name} has {total} {many} and shares them equally among {friends} friends, giving each friend as many as possible. {question}"
    body = (f"Sharing equally means dividing the {many} into {friends} equal groups; whatever cannot be split evenly is left over.\n\n" + steps([
        f"Divide {total} by {friends}. {friends} × {each} = {friends * each}, and {friends} × {each + 1} = {friends * (each + 1)} is more than {total}, so each friend gets {each}.",
        f"Find the remainder: {total} − {friends * each} = {left}.",
        f"Check: {friends} × {each} + {left} = {total}, which is all of {his} {many}.",
    ]) + f"\n\n{ending}")
    return ("sharing", total, friends, question), instruction, body, fmt(answer)


def _multi_step(rng: random.Random) -> Task:
    (name, he, _), (_, many) = rng.choice(PEOPLE), rng.choice(ITEMS)
    friend = rng.choice([p[0] for p in PEOPLE if p[0] != name])
    start, packs, per_pack = rng.randint(5, 40), rng.randint(2, 6), rng.randint(3, 12)
    bought = packs * per_pack
    given = rng.randint(1, start + bought - 1)
    final = start + bought - given
    instruction = (f"{name} had {start} {many}. Then {he} bought {packs} packs with {per_pack} {many} in each pack, "
                   f"and gave {given} {many} to {friend}. How many {many} does {name} have now?")
    body = (f"Let's follow the {many} through each event in order.\n\n" + steps([
        f"{name} starts with {start} {many}.",
        f"{he.capitalize()} buys {packs} packs of {per_pack}, which is {packs} × {per_pack} = {bought} more {many}. Now {he} has {start} + {bought} = {start + bought}.",
        f"{he.capitalize()} gives {given} to {friend}, leaving {start + bought} − {given} = {final}.",
    ]) + f"\n\n{name} now has {final} {many}.")
    return ("multi", start, packs, per_pack, given), instruction, body, fmt(final)


def _speed(rng: random.Random) -> Task:
    vehicle = rng.choice(("train", "car", "bus", "cyclist", "boat"))
    speed, hours = rng.choice((12, 15, 20, 30, 40, 45, 50, 60, 75, 80, 90, 120)), rng.randint(2, 7)
    distance = speed * hours
    if rng.random() < 0.5:
        instruction = f"A {vehicle} travels at a constant speed of {speed} km/h for {hours} hours. How many kilometers does it travel?"
        body = ("Distance, speed and time are related by distance = speed × time.\n\n" + steps([
            f"The speed is {speed} km/h and the time is {hours} hours.",
            f"Multiply: {speed} × {hours} = {distance}.",
            "The units work out: km/h × h = km, so the result is in kilometers.",
        ]) + f"\n\nThe {vehicle} travels {distance} km.")
        return ("distance", speed, hours), instruction, body, fmt(distance)
    instruction = f"A {vehicle} covers {distance} km in {hours} hours. What is its average speed in km/h?"
    body = ("Average speed is the total distance divided by the total time.\n\n" + steps([
        f"The distance is {distance} km and the time is {hours} hours.",
        f"Divide: {distance} ÷ {hours} = {speed}.",
        f"Check: {speed} km/h × {hours} h = {distance} km, as given.",
    ]) + f"\n\nThe average speed is {speed} km/h.")
    return ("speed", distance, hours), instruction, body, fmt(speed)


def _discount(rng: random.Random) -> Task:
    thing = rng.choice(("jacket", "pair of shoes", "backpack", "lamp", "bicycle", "watch", "board game"))
    price, percent = 20 * rng.randint(2, 15), rng.choice((10, 20, 25, 50))
    off = price * percent // 100
    sale = price - off
    instruction = f"A {thing} costs ${price}. It is on sale for {percent}% off. What is the sale price in dollars?"
    body = (f"A discount of {percent}% means we subtract {percent}% of the original price.\n\n" + steps([
        f"Find {percent}% of ${price}: {price} × {percent} ÷ 100 = ${off}.",
        f"Subtract the discount: ${price} − ${off} = ${sale}.",
        f"Check: ${sale} is {100 - percent}% of ${price}, because {price} × {100 - percent} ÷ 100 = {sale}.",
    ]) + f"\n\nThe {thing} costs ${sale} on sale.")
    return ("discount", thing, price, percent), instruction, body, fmt(sale)


def _rectangle(rng: random.Random) -> Task:
    place = rng.choice(("garden", "room", "playground", "parking lot", "swimming pool", "field"))
    length, width = rng.randint(4, 30), rng.randint(2, 20)
    if rng.random() < 0.5:
        area = length * width
        instruction = f"A rectangular {place} is {length} m long and {width} m wide. What is its area in square meters?"
        body = ("The area of a rectangle is its length times its width.\n\n" + steps([
            f"The length is {length} m and the width is {width} m.",
            f"Multiply them: {length} × {width} = {area}.",
            "Meters times meters gives square meters, so the area is in m².",
        ]) + f"\n\nThe {place} has an area of {area} m².")
        return ("area", length, width), instruction, body, fmt(area)
    perimeter = 2 * (length + width)
    instruction = f"A rectangular {place} is {length} m long and {width} m wide. How many meters of fence are needed to go all the way around it?"
    body = ("Going all the way around a rectangle means finding its perimeter: two lengths plus two widths.\n\n" + steps([
        f"Add one length and one width: {length} + {width} = {length + width}.",
        f"Double it for the two remaining sides: 2 × {length + width} = {perimeter}.",
        f"Check: {length} + {width} + {length} + {width} = {perimeter}.",
    ]) + f"\n\n{perimeter} m of fence are needed.")
    return ("perimeter", length, width), instruction, body, fmt(perimeter)


def _ages(rng: random.Random) -> Task:
    name, _, his = rng.choice(PEOPLE)
    age, gap, years = rng.randint(4, 40), rng.randint(2, 15), rng.randint(2, 20)
    relative = rng.choice(("sister", "brother", "cousin"))
    instruction = f"{name} is {age} years old. {his.capitalize()} {relative} is {gap} years older. How old will the {relative} be in {years} years?"
    body = (f"We first find the {relative}'s age today and then move forward in time.\n\n" + steps([
        f"The {relative} is {gap} years older than {name}: {age} + {gap} = {age + gap} years old today.",
        f"In {years} years everyone is {years} years older: {age + gap} + {years} = {age + gap + years}.",
    ]) + f"\n\nThe {relative} will be {age + gap + years} years old.")
    return ("ages", age, gap, years, relative), instruction, body, fmt(age + gap + years)


ARITHMETIC = (_shopping, _sharing, _multi_step, _speed, _discount, _rectangle, _ages)


# --- unit conversions --------------------------------------------------------------------------

# (big unit, its singular, small unit, small units per big unit)
CONVERSIONS = (("kilometers", "kilometer", "meters", 1000), ("meters", "meter", "centimeters", 100),
               ("kilograms", "kilogram", "grams", 1000), ("hours", "hour", "minutes", 60),
               ("minutes", "minute", "seconds", 60), ("liters", "liter", "milliliters", 1000),
               ("days", "day", "hours", 24), ("feet", "foot", "inches", 12), ("yards", "yard", "feet", 3),
               ("weeks", "week", "days", 7), ("inches", "inch", "centimeters", 2.54),
               ("miles", "mile", "feet", 5280))


def _units(rng: random.Random) -> Task:
    if rng.random() < 0.2:
        return _temperature(rng)
    big, one, small, factor = rng.choice(CONVERSIONS)
    if rng.random() < 0.5 or factor == 2.54:
        value = rng.choice((rng.randint(2, 20), rng.randint(2, 20) + 0.5))
        result = round(value * factor, 4)
        instruction = rng.choice((f"Convert {fmt(value)} {big} to {small}.", f"How many {small} are in {fmt(value)} {big}?"))
        body = (f"To convert from {big} to {small}, we use the fact that 1 {one} = {fmt(factor)} {small}. "
                f"Since we go from a larger unit to a smaller one, we multiply.\n\n" + steps([
                    f"Write down the conversion factor: 1 {one} = {fmt(factor)} {small}.",
                    f"Multiply: {fmt(value)} × {fmt(factor)} = {fmt(result)}.",
                ]) + f"\n\nSo {fmt(value)} {big} equals {fmt(result)} {small}.")
        return ("units", big, small, value), instruction, body, fmt(result)
    result = rng.randint(2, 20)
    value = result * factor
    instruction = rng.choice((f"Convert {fmt(value)} {small} to {big}.", f"How many {big} are in {fmt(value)} {small}?"))
    body = (f"To convert from {small} to {big}, we use the fact that 1 {one} = {fmt(factor)} {small}. "
            f"Since we go from a smaller unit to a larger one, we divide.\n\n" + steps([
                f"Write down the conversion factor: 1 {one} = {fmt(factor)} {small}.",
                f"Divide: {fmt(value)} ÷ {fmt(factor)} = {fmt(result)}.",
                f"Check: {fmt(result)} × {fmt(factor)} = {fmt(value)}.",
            ]) + f"\n\nSo {fmt(value)} {small} equals {fmt(result)} {big}.")
    return ("units", small, big, value), instruction, body, fmt(result)


def _temperature(rng: random.Random) -> Task:
    celsius = 5 * rng.randint(-8, 20)  # multiples of 5 give whole Fahrenheit degrees
    fahrenheit = celsius * 9 // 5 + 32
    if rng.random() < 0.5:
        instruction = f"Convert {celsius} degrees Celsius to degrees Fahrenheit."
        body = ("The formula from Celsius to Fahrenheit is F = C × 9/5 + 32.\n\n" + steps([
            f"Multiply by 9/5: {celsius} × 9/5 = {celsius * 9 // 5}.",
            f"Add 32: {celsius * 9 // 5} + 32 = {fahrenheit}.",
        ]) + f"\n\nSo {celsius} °C is {fahrenheit} °F.")
        return ("c2f", celsius), instruction, body, fmt(fahrenheit)
    instruction = f"Convert {fahrenheit} degrees Fahrenheit to degrees Celsius."
    body = ("The formula from Fahrenheit to Celsius is C = (F − 32) × 5/9.\n\n" + steps([
        f"Subtract 32: {fahrenheit} − 32 = {fahrenheit - 32}.",
        f"Multiply by 5/9: {fahrenheit - 32} × 5/9 = {celsius}.",
        f"Check: {celsius} × 9/5 + 32 = {fahrenheit}.",
    ]) + f"\n\nSo {fahrenheit} °F is {celsius} °C.")
    return ("f2c", fahrenheit), instruction, body, fmt(celsius)


# --- lists -------------------------------------------------------------------------------------

WORDS = ("apple", "river", "mountain", "guitar", "pencil", "orange", "window", "garden", "rocket", "banana",
         "candle", "forest", "planet", "bridge", "coffee", "dragon", "island", "jacket", "lemon", "mirror",
         "needle", "ocean", "pepper", "rabbit", "silver", "tomato", "violin", "wizard", "yellow", "zebra",
         "anchor", "butter", "castle", "dinner", "engine", "falcon", "helmet", "kitten", "ladder", "meadow")


def _joined(items) -> str:
    return ", ".join(str(x) for x in items)


def _sort_numbers(rng: random.Random) -> Task:
    numbers = rng.sample(range(1, 100), rng.randint(5, 8))
    descending = rng.random() < 0.4
    order = "descending" if descending else "ascending"
    result = sorted(numbers, reverse=descending)
    instruction = rng.choice((f"Sort these numbers in {order} order: {_joined(numbers)}.",
                              f"Arrange the following numbers from {'largest to smallest' if descending else 'smallest to largest'}: {_joined(numbers)}."))
    pick = "largest" if descending else "smallest"
    lines, rest = [], list(numbers)
    for x in result[:-1]:
        lines.append(f"The {pick} of {_joined(rest)} is {x}; it goes next.")
        rest.remove(x)
    lines.append(f"Only {result[-1]} is left, so it goes last.")
    body = (f"To sort in {order} order, I repeatedly pick the {pick} remaining number.\n\n" + steps(lines)
            + f"\n\nThe sorted list is {_joined(result)}.")
    return ("sort", tuple(numbers), descending), instruction, body, _joined(result)


def _dedupe(rng: random.Random) -> Task:
    base = rng.sample(WORDS, rng.randint(3, 5))
    words = base + [rng.choice(base) for _ in range(rng.randint(2, 4))]
    rng.shuffle(words)
    seen: list[str] = []
    lines = []
    for w in words:
        if w in seen:
            lines.append(f"\"{w}\" has already appeared, so skip it.")
        else:
            seen.append(w)
            lines.append(f"\"{w}\" is new, so keep it.")
    instruction = f"Remove the duplicates from this list, keeping the first occurrence of each item in its original order: {_joined(words)}."
    body = ("I go through the list from left to right and keep a word only the first time I see it.\n\n" + steps(lines)
            + f"\n\nAfter removing {plural(len(words) - len(seen), 'duplicate')}, the list is {_joined(seen)}.")
    return ("dedupe", tuple(words)), instruction, body, _joined(seen)


def _count_item(rng: random.Random) -> Task:
    base = rng.sample(WORDS, rng.randint(2, 4))
    words = [rng.choice(base) for _ in range(rng.randint(6, 10))]
    target = rng.choice(words)
    positions = [i for i, w in enumerate(words, 1) if w == target]
    instruction = f"How many times does \"{target}\" appear in this list: {_joined(words)}?"
    body = (f"I check every item of the list and count those equal to \"{target}\".\n\n" + steps([
        f"The list has {len(words)} items.",
        f"\"{target}\" is at {'position' if len(positions) == 1 else 'positions'} {_joined(positions)}.",
        f"Counting those positions gives {len(positions)}.",
    ]) + f"\n\n\"{target}\" appears {plural(len(positions), 'time')}.")
    return ("count", tuple(words), target), instruction, body, fmt(len(positions))


def _reverse_list(rng: random.Random) -> Task:
    words = rng.sample(WORDS, rng.randint(4, 7))
    result = words[::-1]
    instruction = f"Reverse the order of this list: {_joined(words)}."
    body = ("Reversing a list means the last item comes first and the first item comes last.\n\n" + steps([
        f"The last item is \"{words[-1]}\", so it becomes the first.",
        "Continue from the end towards the start: " + " → ".join(result) + ".",
        f"The first item, \"{words[0]}\", ends up last.",
    ]) + f"\n\nThe reversed list is {_joined(result)}.")
    return ("reverse", tuple(words)), instruction, body, _joined(result)


def _sum_list(rng: random.Random) -> Task:
    numbers = [rng.randint(1, 60) for _ in range(rng.randint(4, 7))]
    instruction = f"What is the sum of the numbers {_joined(numbers)}?"
    total, lines = numbers[0], [f"Start with the first number, {numbers[0]}."]
    for x in numbers[1:]:
        lines.append(f"Add {x}: {total} + {x} = {total + x}.")
        total += x
    body = "I add the numbers one at a time, keeping a running total.\n\n" + steps(lines) + f"\n\nThe sum is {total}."
    return ("sum", tuple(numbers)), instruction, body, fmt(total)


LISTS = (_sort_numbers, _dedupe, _count_item, _reverse_list, _sum_list)


# --- strings -----------------------------------------------------------------------------------

SENTENCES = ("The quick brown fox jumps over the lazy dog", "A journey of a thousand miles begins with a single step",
             "Every cloud has a silver lining", "Practice makes perfect", "The early bird catches the worm",
             "Actions speak louder than words", "Knowledge is power", "Time flies when you are having fun",
             "Where there is a will there is a way", "Curiosity is the engine of learning",
             "Still waters run deep", "Better late than never")
ACRONYMS = ("portable network graphics", "central processing unit", "random access memory", "as soon as possible",
            "frequently asked questions", "graphical user interface", "personal identification number",
            "global positioning system", "artificial intelligence", "light emitting diode")


def _reverse_word(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    result = word[::-1]
    instruction = rng.choice((f"Reverse the word \"{word}\".", f"Write the letters of \"{word}\" in reverse order."))
    body = (f"I read the letters of \"{word}\" from the last one to the first one.\n\n" + steps([
        f"The letters in order are: {' '.join(word)}.",
        f"Read backwards they are: {' '.join(result)}.",
        "Joining them gives the reversed word.",
    ]) + f"\n\n\"{word}\" reversed is \"{result}\".")
    return ("reverse_word", word), instruction, body, result


def _count_letter(rng: random.Random) -> Task:
    text = rng.choice((rng.choice(WORDS), rng.choice(SENTENCES)))
    letters = sorted({c for c in text.lower() if c.isalpha()})
    letter = rng.choice(letters)
    positions = [i for i, c in enumerate(text.lower(), 1) if c == letter]
    instruction = f"How many times does the letter \"{letter}\" appear in \"{text}\"? Count upper- and lowercase alike."
    body = (f"I go through \"{text}\" character by character and count every \"{letter}\" (ignoring case).\n\n" + steps([
        f"The text has {len(text)} characters, spaces included.",
        f"\"{letter}\" is at {'position' if len(positions) == 1 else 'positions'} {_joined(positions)}.",
        f"That makes {plural(len(positions), 'occurrence')}.",
    ]) + f"\n\nThe letter \"{letter}\" appears {plural(len(positions), 'time')}.")
    return ("count_letter", text, letter), instruction, body, fmt(len(positions))


def _count_words(rng: random.Random) -> Task:
    sentence = rng.choice(SENTENCES)
    words = sentence.split()
    instruction = f"How many words are in the sentence \"{sentence}\"?"
    body = ("Words are separated by spaces, so I split the sentence at each space and number the pieces.\n\n" + steps([
        "The words are: " + ", ".join(f"{i}. {w}" for i, w in enumerate(words, 1)) + ".",
        f"The last word is number {len(words)}.",
    ]) + f"\n\nThe sentence has {len(words)} words.")
    return ("count_words", sentence), instruction, body, fmt(len(words))


def _acronym(rng: random.Random) -> Task:
    phrase = rng.choice(ACRONYMS)
    words = phrase.split()
    result = "".join(w[0] for w in words).upper()
    instruction = f"Form an acronym from the first letters of \"{phrase}\"."
    body = ("An acronym takes the first letter of each word and writes them together in capitals.\n\n" + steps([
        "The first letters are: " + ", ".join(f"{w} → {w[0]}" for w in words) + ".",
        f"Written together in capitals they give {result}.",
    ]) + f"\n\nThe acronym is {result}.")
    return ("acronym", phrase), instruction, body, result


def _sort_words(rng: random.Random) -> Task:
    words = rng.sample(WORDS, rng.randint(4, 6))
    result = sorted(words)
    instruction = f"Put these words in alphabetical order: {_joined(words)}."
    body = ("Alphabetical order compares words by their first letter, then the next letter when the first ones are equal.\n\n"
            + steps([
                "The first letters are: " + ", ".join(f"{w} → {w[0]}" for w in words) + ".",
                "Ordering by letter (and by the following letters on ties): " + " < ".join(result) + ".",
            ]) + f"\n\nIn alphabetical order: {_joined(result)}.")
    return ("sort_words", tuple(words)), instruction, body, _joined(result)


STRINGS = (_reverse_word, _count_letter, _count_words, _acronym, _sort_words)


# --- facts -------------------------------------------------------------------------------------

COUNTRIES = (  # country, capital, continent
    ("France", "Paris", "Europe"), ("Germany", "Berlin", "Europe"), ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"), ("Portugal", "Lisbon", "Europe"), ("Poland", "Warsaw", "Europe"),
    ("Sweden", "Stockholm", "Europe"), ("Norway", "Oslo", "Europe"), ("Greece", "Athens", "Europe"),
    ("Ireland", "Dublin", "Europe"), ("Japan", "Tokyo", "Asia"), ("China", "Beijing", "Asia"),
    ("India", "New Delhi", "Asia"), ("Thailand", "Bangkok", "Asia"), ("Vietnam", "Hanoi", "Asia"),
    ("South Korea", "Seoul", "Asia"), ("Turkey", "Ankara", "Asia"), ("Egypt", "Cairo", "Africa"),
    ("Kenya", "Nairobi", "Africa"), ("Nigeria", "Abuja", "Africa"), ("Ghana", "Accra", "Africa"),
    ("Morocco", "Rabat", "Africa"), ("Canada", "Ottawa", "North America"), ("Mexico", "Mexico City", "North America"),
    ("United States", "Washington, D.C.", "North America"), ("Brazil", "Brasília", "South America"),
    ("Argentina", "Buenos Aires", "South America"), ("Peru", "Lima", "South America"),
    ("Australia", "Canberra", "Oceania"), ("New Zealand", "Wellington", "Oceania"),
)
ELEMENTS = (  # name, symbol, atomic number, Latin name the symbol comes from (if not English)
    ("Hydrogen", "H", 1, None), ("Helium", "He", 2, None), ("Lithium", "Li", 3, None), ("Carbon", "C", 6, None),
    ("Nitrogen", "N", 7, None), ("Oxygen", "O", 8, None), ("Fluorine", "F", 9, None), ("Neon", "Ne", 10, None),
    ("Sodium", "Na", 11, "natrium"), ("Magnesium", "Mg", 12, None), ("Aluminium", "Al", 13, None),
    ("Silicon", "Si", 14, None), ("Phosphorus", "P", 15, None), ("Sulfur", "S", 16, None),
    ("Chlorine", "Cl", 17, None), ("Potassium", "K", 19, "kalium"), ("Calcium", "Ca", 20, None),
    ("Iron", "Fe", 26, "ferrum"), ("Copper", "Cu", 29, "cuprum"), ("Zinc", "Zn", 30, None),
    ("Silver", "Ag", 47, "argentum"), ("Tin", "Sn", 50, "stannum"), ("Gold", "Au", 79, "aurum"),
    ("Mercury", "Hg", 80, "hydrargyrum"), ("Lead", "Pb", 82, "plumbum"), ("Uranium", "U", 92, None),
)
PLANETS = (  # name, kind
    ("Mercury", "rocky planet"), ("Venus", "rocky planet"), ("Earth", "rocky planet"), ("Mars", "rocky planet"),
    ("Jupiter", "gas giant"), ("Saturn", "gas giant"), ("Uranus", "ice giant"), ("Neptune", "ice giant"),
)
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")


def _capital(rng: random.Random) -> Task:
    country, capital, continent = rng.choice(COUNTRIES)
    if rng.random() < 0.6:
        instruction = rng.choice((f"What is the capital of {country}?", f"Which city is the capital of {country}?",
                                  f"Name the capital city of {country}."))
        body = (f"{country} is a country in {continent}. Its capital city is {capital}, where the national government "
                f"has its seat. The capital is not always the largest or best-known city of a country, so it is worth "
                f"stating precisely: the capital of {country} is {capital}.")
        return ("capital", country), instruction, body, capital
    instruction = rng.choice((f"{capital} is the capital of which country?", f"Which country has {capital} as its capital?"))
    body = (f"{capital} is the seat of the national government of {country}, a country in {continent}. "
            f"So the country whose capital is {capital} is {country}.")
    return ("country_of", capital), instruction, body, country


def _element(rng: random.Random) -> Task:
    name, symbol, number, latin = rng.choice(ELEMENTS)
    origin = (f" The symbol comes from its Latin name, {latin}, which is why it does not match the English name."
              if latin else f" The symbol is taken from the element's name, {name}.")
    kind = rng.randrange(3)
    if kind == 0:
        instruction = rng.choice((f"What is the chemical symbol for {name.lower()}?", f"Which symbol stands for {name.lower()} on the periodic table?"))
        body = f"{name} is element number {number} of the periodic table, and its chemical symbol is {symbol}.{origin}"
        return ("symbol", name), instruction, body, symbol
    if kind == 1:
        instruction = f"Which chemical element has the symbol {symbol}?"
        body = f"The symbol {symbol} belongs to {name.lower()}, element number {number} of the periodic table.{origin}"
        return ("element_of", symbol), instruction, body, name
    instruction = f"What is the atomic number of {name.lower()}?"
    body = (f"The atomic number is the number of protons in an atom's nucleus, which also fixes the element's place in "
            f"the periodic table. {name} ({symbol}) has {plural(number, 'proton')}, so its atomic number is {number}.")
    return ("atomic_number", name), instruction, body, fmt(number)


def _planet(rng: random.Random) -> Task:
    index = rng.randrange(len(PLANETS))
    name, kind = PLANETS[index]
    order = " → ".join(p for p, _ in PLANETS)
    if rng.random() < 0.5:
        instruction = f"Which planet is the {ORDINALS[index]} planet from the Sun?"
        body = (f"Counting outward from the Sun, the eight planets of the Solar System are: {order}. "
                f"Position {index + 1} is {name}, a {kind}.")
        return ("planet_at", index), instruction, body, name
    instruction = f"Counting from the Sun, what position does {name} have among the planets of the Solar System? Answer with a number."
    body = (f"The eight planets in order from the Sun are: {order}. {name} is a {kind} and comes "
            f"{ORDINALS[index]} in that list, so its position is {index + 1}.")
    return ("position_of", name), instruction, body, fmt(index + 1)


FACTS = (_capital, _capital, _element, _element, _planet)  # weighted by how many facts each table holds

GENERATORS: dict[str, tuple[Callable[[random.Random], Task], ...]] = {
    "arithmetic": ARITHMETIC, "units": (_units,), "lists": LISTS, "strings": STRINGS, "facts": FACTS,
}
_TRIES = 40  # draws per family before it counts as exhausted (facts run out of distinct questions)


def generate(n: int, seed: int = 0, families: tuple[str, ...] | list[str] = FAMILIES) -> list[Record]:
    """``n`` distinct tasks, families in turn; a family that runs out of new questions gives its
    turn to the next one."""
    rng = random.Random(seed)
    families = list(dict.fromkeys(families))
    used: set[tuple] = set()
    exhausted: set[str] = set()
    records: list[Record] = []
    for i in range(n):
        task = None
        for offset in range(len(families)):
            family = families[(i + offset) % len(families)]
            if family in exhausted:
                continue
            for _ in range(_TRIES):
                key, instruction, body, answer = rng.choice(GENERATORS[family])(rng)
                if (family, key) not in used:
                    used.add((family, key))
                    task = family, instruction, body, answer
                    break
            else:
                exhausted.add(family)
                continue
            break
        if task is None:
            raise DataError(f"the families {', '.join(families)} ran out of distinct tasks after {i} of n={n}; "
                            "lower n or add families", where="builtin_tasks")
        family, instruction, body, answer = task
        system = rng.choice(SYSTEM_MESSAGES)
        if "five year old" in system:
            body = "Let's figure this out together, one small step at a time!\n\n" + body
        response = f"{body}\n\nAnswer: {answer}"
        records.append(Record(f"builtin-{seed}-{i:05d}", system, instruction, response, {"task": family, "answer": answer}))
    return records


class BuiltinTasks(DatasetSource):
    """Generated instruction tasks with verifiable answers (see the module docstring)."""

    name = "builtin_tasks"

    class Params(StrictModel):
        n: int = Field(default=240, gt=0)
        seed: int = 0
        families: list[Family] = Field(default_factory=lambda: list(FAMILIES), min_length=1)

    def records(self) -> Iterator[Record | BadRow]:
        yield from generate(self.params.n, self.params.seed, self.params.families)


@hookimpl
def profuser_register_datasets(register):
    register(BuiltinTasks)

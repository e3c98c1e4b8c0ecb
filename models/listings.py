"""Deterministic synthetic product listings for the product-matching example.

Records have the seed demo's shape: ``Title1, ItemSpecifics1, Title2, ItemSpecifics2``,
item specifics written as eBay exports them, ``'Key': ' value'; 'Key': ' value'``
(a value may hold a quote: ``'Screen Size': ' 4''``).

``CATALOGUE`` is a few hundred products (SKUs): families such as "Apple iPhone 5"
expanded over their variant axes (storage, colour, network, ...), each SKU with its
own codes (UPC/EAN/MPN, derived from a hash of its name, so stable). A listing is one
seller's rendering of a SKU: title layout, word order, optional brand, noun and
marketing words, spelling variants ("32 GB", "Colour", "Silver" for "White &
Silver"), a random subset of the specifics plus seller-level ones (cosmetic
condition, lock status), now and then no specifics at all.

``listing_pairs`` draws pairs: half positives (the same SKU listed twice, sometimes
the very same listing), a quarter close negatives (another SKU of the same family,
e.g. iPhone 5 16GB vs 32GB, or another family of the same category) and a quarter
far negatives (another family, any category, e.g. an iPhone vs an aquarium vacuum).
No download; a fixed seed gives the same pairs on every machine.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass

import numpy as np

FIELDS = ("Title1", "ItemSpecifics1", "Title2", "ItemSpecifics2")


@dataclass(frozen=True)
class Family:
    category: str
    brand: str
    model: str
    nouns: tuple[str, ...]
    fixed: tuple[tuple[str, str], ...] = ()
    axes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    codes: str = "upc"  # "upc": UPC + MPN; "ean": EAN + MPN; "unbranded": EAN = ISBN = UPC, no MPN


@dataclass(frozen=True)
class Product:
    family: Family
    variant: tuple[tuple[str, str], ...]
    codes: tuple[tuple[str, str], ...]


_PHONE = ("Smartphone", "Cell Phone", "Phone", "Mobile Phone")
_IPHONE_4 = (("Style", "Bar"), ("Processor", "Dual Core"), ("Camera Resolution", "8.0MP"), ("Screen Size", "4'"))
FAMILIES = (
    Family("phone", "Apple", "iPhone 5", _PHONE, _IPHONE_4, (
        ("Storage Capacity", ("16GB", "32GB", "64GB")),
        ("Color", ("White & Silver", "Black & Slate")),
        ("Network", ("Verizon", "AT&T", "Sprint", "Unlocked")))),
    Family("phone", "Apple", "iPhone 5s", _PHONE, _IPHONE_4, (
        ("Storage Capacity", ("16GB", "32GB", "64GB")),
        ("Color", ("Space Gray", "Silver", "Gold")),
        ("Network", ("Verizon", "AT&T", "Unlocked")))),
    Family("phone", "Apple", "iPhone 5c", _PHONE, _IPHONE_4, (
        ("Storage Capacity", ("8GB", "16GB", "32GB")),
        ("Color", ("Blue", "Green", "Pink", "White")),
        ("Network", ("Verizon", "AT&T")))),
    Family("phone", "Apple", "iPhone 6", _PHONE,
           (("Style", "Bar"), ("Processor", "Dual Core"), ("Camera Resolution", "8.0MP"), ("Screen Size", "4.7'")), (
        ("Storage Capacity", ("16GB", "64GB", "128GB")),
        ("Color", ("Space Gray", "Silver", "Gold")),
        ("Network", ("Verizon", "AT&T", "T-Mobile", "Unlocked")))),
    Family("phone", "Apple", "iPhone 6 Plus", _PHONE,
           (("Style", "Bar"), ("Processor", "Dual Core"), ("Camera Resolution", "8.0MP"), ("Screen Size", "5.5'")), (
        ("Storage Capacity", ("16GB", "64GB", "128GB")),
        ("Color", ("Space Gray", "Silver", "Gold")),
        ("Network", ("Verizon", "AT&T", "Unlocked")))),
    Family("phone", "Samsung", "Galaxy S4", _PHONE,
           (("Style", "Bar"), ("Processor", "Quad Core"), ("Camera Resolution", "13.0MP"), ("Screen Size", "5.0'")), (
        ("Storage Capacity", ("16GB", "32GB")),
        ("Color", ("Black Mist", "White Frost")),
        ("Network", ("Verizon", "AT&T", "Sprint", "Unlocked")))),
    Family("phone", "Samsung", "Galaxy S5", _PHONE,
           (("Style", "Bar"), ("Processor", "Quad Core"), ("Camera Resolution", "16.0MP"), ("Screen Size", "5.1'")), (
        ("Storage Capacity", ("16GB", "32GB")),
        ("Color", ("Charcoal Black", "Shimmery White", "Electric Blue")),
        ("Network", ("Verizon", "AT&T", "T-Mobile")))),
    Family("phone", "Samsung", "Galaxy Note 3", _PHONE,
           (("Style", "Bar"), ("Processor", "Quad Core"), ("Camera Resolution", "13.0MP"), ("Screen Size", "5.7'")), (
        ("Storage Capacity", ("32GB",)),
        ("Color", ("Jet Black", "Classic White")),
        ("Network", ("Verizon", "AT&T", "Sprint")))),
    Family("phone", "LG", "Google Nexus 5", _PHONE,
           (("Style", "Bar"), ("Processor", "Quad Core"), ("Camera Resolution", "8.0MP"), ("Screen Size", "4.95'")), (
        ("Storage Capacity", ("16GB", "32GB")),
        ("Color", ("Black", "White")),
        ("Network", ("Unlocked",)))),
    Family("phone", "HTC", "One M8", _PHONE,
           (("Style", "Bar"), ("Processor", "Quad Core"), ("Camera Resolution", "4.0MP"), ("Screen Size", "5.0'")), (
        ("Storage Capacity", ("32GB",)),
        ("Color", ("Gunmetal Gray", "Glacial Silver")),
        ("Network", ("Verizon", "AT&T", "Sprint")))),
    Family("phone", "Motorola", "Moto X", _PHONE,
           (("Style", "Bar"), ("Processor", "Dual Core"), ("Camera Resolution", "10.0MP"), ("Screen Size", "4.7'")), (
        ("Storage Capacity", ("16GB", "32GB")),
        ("Color", ("Black", "White")),
        ("Network", ("Verizon", "AT&T")))),
    Family("tablet", "Apple", "iPad Air", ("Tablet", "Tablet Computer"), (("Screen Size", "9.7'"), ("Processor", "Apple A7")), (
        ("Storage Capacity", ("16GB", "32GB", "64GB", "128GB")),
        ("Color", ("Space Gray", "Silver")),
        ("Connectivity", ("Wi-Fi", "Wi-Fi + Cellular")))),
    Family("tablet", "Apple", "iPad mini 2", ("Tablet", "Retina Tablet"), (("Screen Size", "7.9'"), ("Processor", "Apple A7")), (
        ("Storage Capacity", ("16GB", "32GB")),
        ("Color", ("Space Gray", "Silver")),
        ("Connectivity", ("Wi-Fi", "Wi-Fi + Cellular")))),
    Family("tablet", "Samsung", "Galaxy Tab 4", ("Tablet", "Android Tablet"), (("Screen Size", "7'"), ("Processor", "Quad Core")), (
        ("Storage Capacity", ("8GB", "16GB")),
        ("Color", ("Black", "White")))),
    Family("aquarium", "Unbranded", "Aquarium Fish Tank Vacuum Gravel Cleaner", ("Water Siphon Pump Filter", "Siphon"),
           (("Type", "Gravel Cleaner"),), (("Color", ("Blue", "Green")),), codes="unbranded"),
    Family("aquarium", "Hygger", "Electric Aquarium Gravel Vacuum", ("Siphon Cleaner", "Water Changer"),
           (("Type", "Gravel Cleaner"),), (("Power", ("20W", "28W", "32W")),), codes="ean"),
    Family("aquarium", "Fluval", "306 Canister Filter", ("Aquarium Filter", "External Filter"),
           (("Type", "Canister Filter"), ("Tank Capacity", "70 Gallons")), codes="upc"),
    Family("aquarium", "Fluval", "406 Canister Filter", ("Aquarium Filter", "External Filter"),
           (("Type", "Canister Filter"), ("Tank Capacity", "100 Gallons")), codes="upc"),
    Family("aquarium", "Tetra", "Whisper Internal Filter", ("Aquarium Filter", "Fish Tank Filter"),
           (("Type", "Internal Filter"),), (("Size", ("10i", "20i", "40i")),)),
    Family("aquarium", "API", "Freshwater Master Test Kit", ("Aquarium Water Test", "Water Testing Kit"), (("Type", "Test Kit"),)),
    Family("aquarium", "Aqueon", "Pro Submersible Heater", ("Aquarium Heater", "Fish Tank Heater"),
           (("Type", "Heater"),), (("Wattage", ("100W", "150W", "200W", "250W")),)),
    Family("camera", "Canon", "EOS Rebel T5", ("Digital SLR Camera", "DSLR Camera"),
           (("Type", "Digital SLR"), ("Megapixels", "18.0 MP")), (("Bundled Items", ("Body Only", "18-55mm Lens")),)),
    Family("camera", "Canon", "EOS Rebel T6i", ("Digital SLR Camera", "DSLR Camera"),
           (("Type", "Digital SLR"), ("Megapixels", "24.2 MP")), (("Bundled Items", ("Body Only", "18-55mm Lens")),)),
    Family("camera", "Nikon", "D3300", ("Digital SLR Camera", "DSLR"),
           (("Type", "Digital SLR"), ("Megapixels", "24.2 MP")),
           (("Bundled Items", ("Body Only", "18-55mm Lens")), ("Color", ("Black", "Red")))),
    Family("camera", "Nikon", "D750", ("Digital SLR Camera", "FX DSLR"),
           (("Type", "Digital SLR"), ("Megapixels", "24.3 MP")), (("Bundled Items", ("Body Only", "24-120mm Lens")),)),
    Family("camera", "Sony", "Alpha a6000", ("Mirrorless Camera", "Digital Camera"),
           (("Type", "Mirrorless Interchangeable Lens"), ("Megapixels", "24.3 MP")),
           (("Color", ("Black", "Silver", "White")), ("Bundled Items", ("Body Only", "16-50mm Lens")))),
    Family("headphones", "Beats", "Studio Wireless", ("Headphones", "Over-Ear Headphones"),
           (("Form Factor", "Over-the-Ear"), ("Connectivity", "Bluetooth")), (("Color", ("Black", "White", "Red", "Blue")),)),
    Family("headphones", "Bose", "QuietComfort 25", ("Headphones", "Noise Cancelling Headphones"),
           (("Form Factor", "Over-the-Ear"), ("Connectivity", "Wired")), (("Color", ("Black", "White")),)),
    Family("headphones", "Bose", "QuietComfort 35", ("Wireless Headphones", "Noise Cancelling Headphones"),
           (("Form Factor", "Over-the-Ear"), ("Connectivity", "Bluetooth")), (("Color", ("Black", "Silver")),)),
    Family("headphones", "Sony", "MDR-7506", ("Studio Headphones", "Professional Headphones"),
           (("Form Factor", "Over-the-Ear"), ("Connectivity", "Wired"))),
    Family("headphones", "Sennheiser", "HD 280 Pro", ("Headphones", "Monitor Headphones"),
           (("Form Factor", "Over-the-Ear"), ("Connectivity", "Wired")), codes="ean"),
    Family("laptop", "Apple", "MacBook Air", ("Laptop", "Notebook"), (("Screen Size", "13.3'"), ("Operating System", "Mac OS X")), (
        ("Processor Type", ("Intel Core i5", "Intel Core i7")),
        ("RAM", ("4GB", "8GB")),
        ("Hard Drive Capacity", ("128GB SSD", "256GB SSD")))),
    Family("laptop", "Dell", "XPS 13", ("Laptop", "Ultrabook"), (("Screen Size", "13.3'"), ("Operating System", "Windows 10")), (
        ("RAM", ("8GB", "16GB")),
        ("Hard Drive Capacity", ("256GB SSD", "512GB SSD")))),
    Family("laptop", "Lenovo", "ThinkPad T450", ("Laptop", "Business Laptop"), (("Screen Size", "14'"), ("Processor Type", "Intel Core i5")), (
        ("RAM", ("4GB", "8GB")),
        ("Hard Drive Capacity", ("500GB HDD", "256GB SSD")))),
    Family("console", "Sony", "PlayStation 4", ("Console", "Game Console"), (("Platform", "Sony PlayStation 4"),), (
        ("Hard Drive Capacity", ("500GB", "1TB")),
        ("Color", ("Jet Black", "Glacier White")))),
    Family("console", "Microsoft", "Xbox One", ("Console", "Gaming Console"), (("Platform", "Microsoft Xbox One"),), (
        ("Hard Drive Capacity", ("500GB", "1TB")),
        ("Color", ("Black", "White")))),
    Family("console", "Nintendo", "Wii U", ("Console", "Deluxe Set"), (("Platform", "Nintendo Wii U"),), (
        ("Hard Drive Capacity", ("8GB", "32GB")),
        ("Color", ("Black", "White")))),
)

_EXTRAS = ("New", "Genuine", "Free Shipping", "Fast Dispatch", "Boxed", "Original", "Excellent Condition", "Great Deal", "US Seller", "L@@K")
_CONDITIONS = ("Excellent", "Good", "Fair", "Mint", "Very Good")


def _digits(text: str, count: int) -> str:
    return str(int(hashlib.sha256(text.encode()).hexdigest(), 16))[:count]


def _codes(family: Family, name: str) -> tuple[tuple[str, str], ...]:
    """A SKU's codes, stable across runs and machines (a hash of its name)."""
    if family.codes == "unbranded":
        ean = "489" + _digits(name, 10)
        return (("EAN", ean), ("MPN", "Does not apply"), ("ISBN", ean), ("UPC", ean))
    mpn = family.brand[:2].upper() + _digits("mpn " + name, 4) + ("LL/A" if family.brand == "Apple" else "")
    if family.codes == "ean":
        return (("EAN", "40" + _digits(name, 11)), ("MPN", mpn))
    return (("UPC", "8" + _digits(name, 11)), ("MPN", mpn))


def _catalogue() -> list[Product]:
    products = []
    for family in FAMILIES:
        keys = [k for k, _ in family.axes]
        for values in itertools.product(*(v for _, v in family.axes)):
            variant = tuple(zip(keys, values))
            name = " ".join([family.brand, family.model, *values])
            products.append(Product(family, variant, _codes(family, name)))
    return products


CATALOGUE = _catalogue()
_BY_FAMILY = {f: [p for p in CATALOGUE if p.family == f] for f in FAMILIES}


def _spell(rng: random.Random, key: str, value: str) -> str:
    """One seller's way of writing a value."""
    if value.endswith(("GB", "TB")) and value[:-2].isdigit() and rng.random() < 0.25:
        return value[:-2] + " " + value[-2:]
    if " & " in value:  # "White & Silver": the whole, "White/Silver", or one of the two
        first, second = value.split(" & ")
        return rng.choice([value, value, f"{first}/{second}", first, second])
    if value == "Unlocked" and rng.random() < 0.3:
        return "Factory Unlocked"
    if value == "AT&T" and rng.random() < 0.2:
        return "ATT"
    return value


def _title(rng: random.Random, product: Product) -> str:
    family = product.family
    attrs = [_spell(rng, k, v) for k, v in product.variant if rng.random() < 0.85]
    if rng.random() < 0.25:
        rng.shuffle(attrs)
    head = [family.model]
    if family.brand != "Unbranded" and rng.random() < 0.9:
        head = [family.model, family.brand] if rng.random() < 0.1 else [family.brand, family.model]
    noun = [rng.choice(family.nouns)] if rng.random() < 0.75 else []
    extras = rng.sample(_EXTRAS, rng.choice((0, 0, 1, 1, 2)))
    if rng.random() < 0.4 and attrs:  # the seller tool's layout: "Apple iPhone 5 - 32GB - White & Silver (Verizon) Smartphone"
        title = " - ".join([" ".join(head), *attrs[:-1]]) + f" ({attrs[-1]})"
        words = [title, *noun]
    else:
        words = [*head, *attrs, *noun]
    words = [*extras, *words] if rng.random() < 0.5 else [*words, *extras]
    title = " ".join(words)
    roll = rng.random()
    return title.upper() if roll < 0.06 else title.lower() if roll < 0.09 else title


def _seller_specifics(rng: random.Random, product: Product) -> list[tuple[str, str]]:
    """Specifics about the item on sale, not the product: they differ between sellers."""
    if product.family.category == "phone":
        network = dict(product.variant).get("Network", "")
        lock = "Factory Unlocked" if network == "Unlocked" else "Network Locked"
        return [("Lock Status", lock), ("Cosmetic condition", rng.choice(_CONDITIONS)), ("No accessories", rng.choice(("Yes", "No")))]
    return [("Bundle Listing", "No"), ("Warranty", rng.choice(("No Warranty", "30 Days", "1 Year")))]


def _key(rng: random.Random, key: str) -> str:
    if key == "Color" and rng.random() < 0.15:
        return "Colour"
    if " " in key and rng.random() < 0.15:  # "Storage capacity"
        first, rest = key.split(" ", 1)
        return f"{first} {rest.lower()}"
    return key


def _specifics(rng: random.Random, product: Product) -> str:
    if rng.random() < 0.04:
        return ""
    family = product.family
    items = [("Brand", family.brand), *family.fixed, *product.variant, ("Model", family.model)]
    items += [kv for kv in _seller_specifics(rng, product) if rng.random() < 0.5]
    items += product.codes
    if family.codes == "unbranded":
        items.append(("Designer/Brand", family.brand))
    keep = {"Brand": 0.95, "Model": 0.9, "UPC": 0.65, "EAN": 0.65, "ISBN": 0.65, "MPN": 0.65}
    kept = [(_key(rng, k), _spell(rng, k, v)) for k, v in items if rng.random() < keep.get(k, 0.8)]
    if rng.random() < 0.15:
        rng.shuffle(kept)
    return "; ".join(f"'{k}': ' {v}'" for k, v in kept)


def listing(rng: random.Random, product: Product) -> tuple[str, str]:
    """One seller's listing of ``product``: (title, item specifics)."""
    return _title(rng, product), _specifics(rng, product)


def _other(rng: random.Random, a: Product, close: bool) -> Product:
    family = a.family
    if close:
        siblings = [p for p in _BY_FAMILY[family] if p != a]
        if siblings and rng.random() < 0.5:
            return rng.choice(siblings)
        cousins = [f for f in FAMILIES if f != family and f.category == family.category]
        return rng.choice(_BY_FAMILY[rng.choice(cousins)])
    return rng.choice(_BY_FAMILY[rng.choice([f for f in FAMILIES if f != family])])


def listing_pairs(n: int = 2000, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pairs as an object array [n, 4] (columns ``FIELDS``) and labels (1.0: same product)."""
    rng = random.Random(seed)
    rows, labels = [], []
    for i in range(n):
        a = rng.choice(_BY_FAMILY[rng.choice(FAMILIES)])
        b = a if i % 2 == 0 else _other(rng, a, close=i % 4 == 1)
        first = listing(rng, a)
        second = first if a == b and rng.random() < 0.08 else listing(rng, b)  # the same listing twice
        if rng.random() < 0.5:
            first, second = second, first
        rows.append((*first, *second))
        labels.append(1.0 if a == b else 0.0)
    return np.array(rows, dtype=object), np.array(labels)


# The seed demo's two records, exactly as published (endpointML-records.json): an
# Apple iPhone 5 listing against an aquarium gravel vacuum, and against itself.
_IPHONE_TITLE = "Apple iPhone 5 - 32GB - White & Silver (Verizon) Smartphone"
_IPHONE_SPECIFICS = (
    "'Brand': ' Apple'; 'Style': ' Bar'; 'Processor': ' Dual Core'; 'Camera Resolution': ' 8.0MP'; "
    "'Color': ' Silver'; 'Lock Status': ' Network Locked'; 'Network': ' Verizon'; 'Model': ' iPhone 5'; "
    "'Storage Capacity': ' 32GB'; 'Cosmetic condition': ' Excellent'; 'Screen Size': ' 4''; "
    "'No accessories': ' Yes'; 'UPC': ' 492550400162'"
)
DEMO_RECORDS = [
    {
        "Title1": _IPHONE_TITLE,
        "ItemSpecifics1": _IPHONE_SPECIFICS,
        "Title2": "Aquarium Fish Tank Vacuum Gravel Cleaner Water Siphon Pump Filter",
        "ItemSpecifics2": "'Brand': ' Unbranded'; 'EAN': ' 4894462250013'; 'MPN': ' Does not apply'; "
        "'ISBN': ' 4894462250013'; 'UPC': ' 4894462250013'; 'Designer/Brand': ' Unbranded'",
    },
    {"Title1": _IPHONE_TITLE, "ItemSpecifics1": _IPHONE_SPECIFICS, "Title2": _IPHONE_TITLE, "ItemSpecifics2": _IPHONE_SPECIFICS},
]

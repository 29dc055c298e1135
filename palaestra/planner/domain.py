"""The planner domain's catalogue and rules: ingredients, dietary restrictions, recipes, what a plan costs.

The base every other planner module reads (the data generator, the metrics, the preference pairs), so
that none of them imports another in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["INGREDIENTS", "RECIPES", "RESTRICTIONS", "Recipe", "household_restrictions", "plan_cost", "recipe_allowed"]

# name -> (price per member per unit, flags that dietary restrictions look at)
INGREDIENTS: dict[str, tuple[float, frozenset[str]]] = {
    name: (price, frozenset(flags.split()))
    for name, price, flags in [
        ("rice", 0.5, ""), ("pasta", 0.5, "gluten"), ("bread", 0.5, "gluten"),
        ("tortilla", 0.5, "gluten"), ("couscous", 0.5, "gluten"), ("oats", 0.5, ""),
        ("potato", 0.5, ""), ("lentils", 0.5, ""), ("chickpeas", 1.0, ""),
        ("black_beans", 1.0, ""), ("tofu", 1.5, ""), ("eggs", 1.0, ""), ("chicken", 2.5, "meat"),
        ("beef", 3.0, "meat"), ("salmon", 3.0, "fish"), ("tuna", 1.5, "fish"),
        ("cheese", 1.5, "dairy"), ("yogurt", 1.0, "dairy"), ("milk", 0.5, "dairy"),
        ("peanuts", 1.0, "nuts"), ("cashews", 2.0, "nuts"), ("almonds", 2.0, "nuts"),
        ("pesto", 1.5, "nuts dairy"), ("soy_sauce", 0.5, "gluten"), ("coconut_milk", 1.0, ""),
        ("tomato", 0.5, ""), ("onion", 0.5, ""), ("spinach", 1.0, ""), ("pepper", 1.0, ""),
        ("broccoli", 1.0, ""), ("carrot", 0.5, ""), ("mushroom", 1.0, ""), ("zucchini", 1.0, ""),
    ]
}

# restriction -> ingredient flags it rules out
RESTRICTIONS: dict[str, frozenset[str]] = {
    name: frozenset(flags.split())
    for name, flags in [("vegetarian", "meat fish"), ("nut_allergy", "nuts"),
                        ("gluten_free", "gluten"), ("dairy_free", "dairy")]
}


@dataclass(frozen=True)
class Recipe:
    """One catalogue recipe."""

    name: str
    """Short identifier, as written in plans."""
    ingredients: tuple[str, ...]
    """Keys of ``INGREDIENTS``; one unit of each per meal."""
    minutes: int
    """Cooking time."""

    @property
    def flags(self) -> frozenset[str]:
        """Union of the ingredients' flags (meat, fish, nuts, gluten, dairy)."""
        return frozenset().union(*(INGREDIENTS[i][1] for i in self.ingredients))


# name, minutes, ingredients (one unit each per meal)
_RECIPE_TABLE = """
veggie_stir_fry    20  rice tofu broccoli pepper soy_sauce
lentil_curry       35  lentils rice onion tomato coconut_milk
chickpea_curry     30  chickpeas rice spinach coconut_milk onion
pasta_pomodoro     20  pasta tomato onion cheese
pesto_pasta        15  pasta pesto spinach
mac_and_cheese     25  pasta cheese milk
chicken_rice_bowl  30  chicken rice broccoli soy_sauce
chicken_fajitas    25  chicken tortilla pepper onion
beef_tacos         20  beef tortilla tomato cheese
beef_stew          60  beef potato carrot onion
salmon_potatoes    30  salmon potato spinach
salmon_rice_bowl   25  salmon rice spinach soy_sauce
tuna_pasta         15  tuna pasta tomato
tuna_salad         10  tuna eggs spinach tomato
omelette           10  eggs cheese spinach mushroom
shakshuka          25  eggs tomato pepper onion bread
bean_burrito       20  black_beans tortilla rice cheese pepper
black_bean_soup    40  black_beans onion carrot tomato
peanut_noodles     20  pasta peanuts soy_sauce carrot
cashew_chicken     25  chicken cashews rice pepper
almond_oat_bowl    10  oats almonds yogurt
overnight_oats      5  oats milk yogurt
mushroom_risotto   45  rice mushroom onion cheese
stuffed_peppers    50  pepper rice black_beans tomato cheese
veggie_couscous    25  couscous chickpeas zucchini carrot
tofu_scramble      15  tofu spinach mushroom pepper
baked_potato       45  potato cheese broccoli
zucchini_frittata  30  eggs zucchini cheese onion
grilled_cheese     10  bread cheese tomato
lentil_soup        40  lentils carrot onion tomato
coconut_tofu_rice  30  rice tofu coconut_milk spinach
chicken_soup       50  chicken carrot potato onion
"""
RECIPES: dict[str, Recipe] = {
    name: Recipe(name, tuple(ingredients), int(minutes))
    for name, minutes, *ingredients in (line.split() for line in _RECIPE_TABLE.strip().splitlines())
}


def household_restrictions(household: dict) -> list[str]:
    """Sorted union of the members' restrictions."""
    return sorted({r for member in household["members"] for r in member["restrictions"]})


def recipe_allowed(recipe: Recipe, restrictions: list[str], max_minutes: int | None = None) -> bool:
    """True if no restriction rules out an ingredient and the recipe fits the time limit."""
    banned = frozenset().union(*(RESTRICTIONS[r] for r in restrictions))
    return not (recipe.flags & banned) and (max_minutes is None or recipe.minutes <= max_minutes)


def plan_cost(
    recipes: list[str], pantry: dict[str, int], members: int
) -> tuple[float, list[list[str]]]:
    """Cost of cooking ``recipes`` in order, pantry units first; also the pantry items each used."""
    left, total, used = dict(pantry), 0.0, []
    for name in recipes:
        meal_used = []
        for ingredient in RECIPES[name].ingredients:
            if left.get(ingredient, 0) > 0:
                left[ingredient] -= 1
                meal_used.append(ingredient)
            else:
                total += INGREDIENTS[ingredient][0] * members
        used.append(meal_used)
    return round(total, 2), used

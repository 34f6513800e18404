"""The page-quality benchmark's prompts: everyday requests, each with what a good page shows.

Every prompt carries the words an on-topic heading would contain (any one of them, matched
case-insensitively inside the heading's text, so "bakery" also matches "Bakery's") and the
blocks the prompt asks for, checked in the rendered DOM by :mod:`bench.quality_measure`.
The prompts are the benchmark's own: none of them is a worked example of ``model.page``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Block(StrEnum):
    """Something a prompt asks the page to show; each has one DOM check."""

    CARDS = "cards"  # three or more sub-headings (features, projects, services, ...)
    CTA = "cta"  # a button or a short link to act on
    PRICES = "prices"  # three or more prices ("$9", "12 €", "9/mo")
    FORM = "form"  # two or more form controls (input, textarea, select)
    QUESTIONS = "questions"  # three or more questions (text ending with "?")
    TABLE = "table"  # a table with three or more rows
    STATS = "stats"  # three or more numbers in the text
    DAYS = "days"  # two or more days ("Day 1", "Monday")
    TIMES = "times"  # two or more times of day ("9:00", "7 pm")
    PARAGRAPHS = "paragraphs"  # three or more paragraphs of a dozen words or more
    EXPERIENCE = "experience"  # a heading or text about work experience
    SKILLS = "skills"  # a list of skills (the word, and a list of three or more items)
    LIST = "list"  # a list of three or more items


@dataclass(frozen=True)
class QualityPrompt:
    """One benchmark prompt: ``id`` names its files, ``keywords`` make a heading on-topic."""

    id: str
    prompt: str
    keywords: tuple[str, ...]
    blocks: tuple[Block, ...]


def _p(id: str, prompt: str, keywords: str, *blocks: Block) -> QualityPrompt:
    return QualityPrompt(id, prompt, tuple(keywords.split(",")), blocks)


B = Block

PROMPTS: tuple[QualityPrompt, ...] = (
    # landing and product pages
    _p(
        "bakery",
        "a landing page for a bakery in Lyon with our breads, pastries and opening hours",
        "bakery,bread,pastr,boulangerie,lyon",
        B.CARDS,
        B.CTA,
    ),
    _p(
        "dog-walking",
        "a landing page for a dog walking service with three reasons to choose us and a "
        "booking button",
        "dog,walk,pet,paw",
        B.CARDS,
        B.CTA,
    ),
    _p(
        "coworking",
        "a homepage for a coworking space in Berlin: desks, meeting rooms and a community",
        "cowork,workspace,berlin,desk,office",
        B.CARDS,
        B.CTA,
    ),
    _p(
        "headphones",
        "a product page for wireless noise-cancelling headphones with features and a buy button",
        "headphone,audio,sound,wireless,noise",
        B.CARDS,
        B.CTA,
    ),
    _p(
        "coffee-beans",
        "a product page for a bag of single-origin Ethiopian coffee beans",
        "coffee,bean,ethiopia,roast",
        B.CARDS,
        B.CTA,
    ),
    _p(
        "plumber",
        "a website for a local plumber: services, emergency call-outs and a phone number",
        "plumb,pipe,drain,leak",
        B.CARDS,
        B.CTA,
    ),
    _p(
        "todo-app",
        "a landing page for a to-do list mobile app with its main features",
        "to-do,todo,task,list,app",
        B.CARDS,
        B.CTA,
    ),
    _p(
        "yoga-studio",
        "a landing page for a yoga studio with class types and a free first class offer",
        "yoga,studio,class,stretch",
        B.CARDS,
        B.CTA,
    ),
    _p(
        "electric-bike",
        "a product launch page for a folding electric bike",
        "bike,bicycle,e-bike,cycl,electric",
        B.CARDS,
        B.CTA,
    ),
    # pricing
    _p(
        "saas-pricing",
        "a pricing page for a project management tool with free, pro and team plans",
        "pric,plan,project,team",
        B.PRICES,
        B.CARDS,
    ),
    _p(
        "gym-pricing",
        "a pricing table for a gym membership: monthly, yearly and student",
        "gym,membership,fitness,pric,plan",
        B.PRICES,
        B.CARDS,
    ),
    _p(
        "hosting-plans",
        "a page comparing three web hosting plans with prices and storage",
        "host,plan,pric,server,web",
        B.PRICES,
        B.CARDS,
    ),
    _p(
        "cleaning-prices",
        "a price list for a house cleaning service",
        "clean,house,home,pric",
        B.PRICES,
    ),
    # forms
    _p(
        "contact-form",
        "a contact form for a web design agency with name, email and message",
        "contact,touch,agency,design,message",
        B.FORM,
    ),
    _p(
        "newsletter-signup",
        "a newsletter sign up page for a gardening blog",
        "newsletter,garden,sign up,subscribe,join",
        B.FORM,
    ),
    _p(
        "event-registration",
        "a registration form for a 10k charity run",
        "regist,run,race,10k,charity",
        B.FORM,
    ),
    _p(
        "wedding-rsvp",
        "an RSVP form for our wedding with guest count and meal choice",
        "rsvp,wedding,guest,celebrat",
        B.FORM,
    ),
    _p(
        "feedback-survey",
        "a customer feedback survey for a restaurant",
        "feedback,survey,restaurant,experience,review",
        B.FORM,
    ),
    # FAQ
    _p(
        "faq-shipping",
        "an FAQ page for an online shoe store about shipping, returns and sizes",
        "faq,question,shoe,shipping,help",
        B.QUESTIONS,
    ),
    _p(
        "faq-vpn",
        "frequently asked questions for a VPN app",
        "faq,question,vpn,privacy,help",
        B.QUESTIONS,
    ),
    _p(
        "faq-daycare",
        "a help center page for parents at a daycare: hours, meals and sick days",
        "help,faq,question,daycare,parent,child",
        B.QUESTIONS,
    ),
    # articles
    _p(
        "blog-sourdough",
        "a blog post about baking your first sourdough loaf",
        "sourdough,bread,loaf,bak",
        B.PARAGRAPHS,
    ),
    _p(
        "blog-remote-work",
        "a blog post with five tips for working from home",
        "home,remote,work,tip",
        B.PARAGRAPHS,
    ),
    _p(
        "article-bees",
        "an article explaining why bees matter for our food",
        "bee,pollinat,honey,food",
        B.PARAGRAPHS,
    ),
    _p(
        "news-library",
        "a news story about a town library reopening after renovation",
        "library,reopen,town,renovat",
        B.PARAGRAPHS,
    ),
    # dashboards
    _p(
        "sales-dashboard",
        "a sales dashboard with revenue, orders and a table of recent orders",
        "sales,dashboard,revenue,order",
        B.STATS,
        B.TABLE,
    ),
    _p(
        "fitness-dashboard",
        "a personal fitness dashboard showing steps, sleep and workouts this week",
        "fitness,dashboard,step,workout,health,activity",
        B.STATS,
        B.TABLE,
    ),
    _p(
        "server-metrics",
        "an admin panel with server metrics: CPU, memory and uptime",
        "server,admin,metric,dashboard,system,monitor",
        B.STATS,
        B.TABLE,
    ),
    # itineraries
    _p(
        "kyoto-trip",
        "a three-day itinerary for a trip to Kyoto",
        "kyoto,japan,itinerar,trip,day",
        B.DAYS,
        B.LIST,
    ),
    _p(
        "road-trip",
        "a road trip plan along the California coast, day by day",
        "road trip,california,coast,trip,itinerar",
        B.DAYS,
        B.LIST,
    ),
    _p(
        "lisbon-weekend",
        "a weekend itinerary for Lisbon with food and museums",
        "lisbon,portugal,itinerar,weekend,trip",
        B.DAYS,
        B.LIST,
    ),
    # portfolios
    _p(
        "photographer-portfolio",
        "a portfolio for a wedding photographer",
        "photo,portfolio,wedding",
        B.CARDS,
    ),
    _p(
        "developer-portfolio",
        "a portfolio page for a frontend developer with three projects",
        "developer,portfolio,project,frontend,web",
        B.CARDS,
    ),
    _p(
        "illustrator-gallery",
        "a gallery showcase for an illustrator's children's book art",
        "illustrat,gallery,art,portfolio,book",
        B.CARDS,
    ),
    # resumes
    _p(
        "nurse-resume",
        "a resume for a registered nurse with ten years of experience",
        "nurse,resume,rn,care",
        B.EXPERIENCE,
        B.SKILLS,
    ),
    _p(
        "data-analyst-cv",
        "a CV for a junior data analyst",
        "analyst,data,cv,resume",
        B.EXPERIENCE,
        B.SKILLS,
    ),
    _p(
        "chef-resume",
        "a one-page resume for a pastry chef",
        "chef,pastry,resume,cv",
        B.EXPERIENCE,
        B.SKILLS,
    ),
    # menus
    _p(
        "pizzeria-menu",
        "a menu for a neighbourhood pizzeria with pizzas, drinks and desserts",
        "pizz,menu,italian",
        B.PRICES,
    ),
    _p(
        "cafe-menu",
        "a breakfast menu for a small café",
        "café,cafe,breakfast,menu,coffee",
        B.PRICES,
    ),
    _p(
        "food-truck",
        "a page for a taco food truck with its menu and where to find it this week",
        "taco,food truck,truck,menu,mexican",
        B.PRICES,
    ),
    # events
    _p(
        "tech-conference",
        "a page for a one-day tech conference with the schedule and speakers",
        "conference,tech,summit,schedule,event",
        B.TIMES,
        B.CTA,
    ),
    _p(
        "jazz-concert",
        "an event page for an open-air jazz concert in the park on a Saturday evening",
        "jazz,concert,music,park,event",
        B.TIMES,
        B.CTA,
    ),
    _p(
        "book-club",
        "a meetup page for a monthly book club",
        "book,club,meetup,read",
        B.TIMES,
        B.CTA,
    ),
    _p(
        "farmers-market",
        "a page for a summer farmers market festival with stalls and a timetable",
        "farmer,market,festival,summer",
        B.TIMES,
        B.CTA,
    ),
)


def prompt_ids() -> list[str]:
    """Every prompt's id, in order (ids are unique: they name files)."""
    return [prompt.id for prompt in PROMPTS]

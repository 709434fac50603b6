"""The seed guide's five tech-news lines, the dataset of the README walkthrough."""

TECH_NEWS = (
    "Apple Inc. released its new iPhone model yesterday, featuring a longer battery life and a "
    "more advanced camera system. Experts say the release positions Apple as a strong contender "
    "in the upcoming holiday shopping season.\n"
    "Google announced a new feature in its search engine that aims to combat misinformation. The "
    "feature will prompt users with reliable sources when they search for topics that are prone "
    "to misinformation.\n"
    "Tesla's latest electric vehicle model has been receiving rave reviews for its performance "
    "and sustainability features. However, critics point out that the high price tag may make it "
    "inaccessible for many consumers.\n"
    "Amazon's quarterly profits exceeded expectations, boosted by the surge in online shopping "
    "amid the COVID-19 pandemic. The company announced that it would be hiring 100,000 more "
    "workers to keep up with demand.\n"
    "Microsoft's new operating system update includes several features aimed at enhancing user "
    "privacy. The update will be rolled out to users in phases starting next month.\n"
)

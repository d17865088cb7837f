"""`adqueue serve`: the morning review of last night's defects, as a small server-rendered web app.

Pages read SQL through adqueue.web.queries; the only write is a review (adqueue.store.reviews).
Templates, the stylesheet and every chart are in this package: nothing is fetched at run time.
"""

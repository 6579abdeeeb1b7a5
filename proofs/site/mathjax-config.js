// MathJax 3 reads this before it loads (assets/mathjax/tex-chtml.js, served by the site itself).
// pymdownx.arithmatex (generic mode) wraps math in \( \) and \[ \] inside elements of class "arithmatex";
// only those (and the navigation's copies of headings) are typeset, so code listings and notebook outputs keep
// their dollar signs.
//
// MathJax's accessibility Explorer and its collapsible math read the speech rule engine's maps as data, which a
// page opened from the folder (file://) may not request: with either switched on, no math would be typeset. A
// reader's saved menu settings are switched off before MathJax reads them, and the menu items are disabled.
(function () {
  const key = "MathJax-Menu-Settings";
  const SRE_SETTINGS = ["explorer", "collapsible", "autocollapse"];
  try {
    const saved = JSON.parse(window.localStorage.getItem(key) || "null");
    if (saved && SRE_SETTINGS.some((name) => saved[name])) {
      SRE_SETTINGS.forEach((name) => (saved[name] = false));
      window.localStorage.setItem(key, JSON.stringify(saved));
    }
  } catch (e) {
    // no local storage, or nothing readable saved in it: nothing to switch off
  }
})();

window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex|md-nav__link|md-ellipsis",  // math in the text, and in headings shown in the navigation
  },
  startup: {
    pageReady: function () {
      const menu = MathJax.startup.document.menu;
      ["Activate", "Collapsible", "AutoCollapse"].forEach(function (id) {  // the three settings above
        const item = menu && menu.menu.findID("Accessibility", id);
        if (item) item.disable();
      });
      return MathJax.startup.defaultPageReady().then(function () {
        document.documentElement.setAttribute("data-mathjax", "done");
      });
    },
  },
};

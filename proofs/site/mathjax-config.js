// MathJax 3 reads this before it loads (assets/mathjax/tex-chtml.js, served by the site itself).
// pymdownx.arithmatex (generic mode) wraps math in \( \) and \[ \] inside elements of class "arithmatex";
// only those (and the navigation's copies of headings) are typeset, so code listings and notebook outputs keep
// their dollar signs.
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
      return MathJax.startup.defaultPageReady().then(function () {
        document.documentElement.setAttribute("data-mathjax", "done");
      });
    },
  },
};
